#![no_main]
// The harness and its invariants live in the library: tidepool_fuzz::authority.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tidepool_fuzz::authority::run(data));
