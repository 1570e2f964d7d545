//! The standalone loader: [`standalone::parse`] on any text, which checks
//! every pool with `validate.rs` (`ConnectionPoolSpec::settings`). What it
//! accepts must be a configuration the runtime can run: settings the pool
//! takes, addresses the validator passes, and every pool reachable by its
//! name.

use std::path::Path;

use tidepool_agent::router::{RouteError, Routes};
use tidepool_agent::runtime::pool_settings;
use tidepool_agent::standalone;
use tidepool_crds::validate::check_address;

/// One file's text.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pools = match standalone::parse(Path::new("pools.yaml"), text) {
        Ok(pools) => pools,
        Err(error) => {
            // Every refusal names the file.
            assert!(error.to_string().starts_with("pools.yaml: "), "{error}");
            return;
        }
    };
    for pool in &pools {
        let key = pool.key();
        if let Err(error) = pool_settings(&key, pool) {
            panic!("{key} was accepted but the runtime refuses it: {error}");
        }
        for address in &pool.addresses {
            assert_eq!(check_address(address), Ok(()), "{key}");
        }
        assert!(pool.spec.target.service.is_none() && pool.spec.clients.is_none());
    }
    // A static pool answers to `name.namespace`, alone or (when two pools
    // share the name) ambiguously, naming it.
    let routes = Routes::new(&pools);
    for pool in &pools {
        let key = pool.key();
        let authority = format!("{}.{}", pool.name, pool.namespace);
        match routes.lookup(&authority) {
            Ok(found) => assert_eq!(found, key, "{authority:?}"),
            Err(RouteError::Ambiguous { pools, .. }) => {
                assert!(
                    pools.split(", ").any(|p| p == key),
                    "{authority:?}: {pools}"
                )
            }
            Err(error) => panic!("{key} was accepted but {authority:?} does not reach it: {error}"),
        }
    }
}
