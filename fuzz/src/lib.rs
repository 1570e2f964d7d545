//! The fuzz harnesses: each module takes libFuzzer's bytes, feeds them to
//! the product code that reads untrusted input, and asserts what must hold
//! whatever the input (a failed assertion is a crash libFuzzer reports).
//! The targets in `fuzz_targets/` only call `run`; [`seeds`] writes the
//! committed corpora.

pub mod agent_control;
pub mod authority;
pub mod grpc_timeout;
pub mod operator_control;
pub mod seeds;
pub mod standalone;

/// Splits `data` into protobuf messages, each prefixed by one control
/// byte (its meaning is the harness's) and its length as a varint, the
/// way a gRPC stream frames them. Stops at the first frame that does not
/// decode.
pub fn frames<M: prost::Message + Default>(mut data: &[u8]) -> impl Iterator<Item = (u8, M)> {
    std::iter::from_fn(move || {
        let (&control, rest) = data.split_first()?;
        data = rest;
        let message = M::decode_length_delimited(&mut data).ok()?;
        Some((control, message))
    })
}

/// The inverse of [`frames`], for seeds.
pub fn encode_frames<M: prost::Message>(frames: &[(u8, M)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (control, message) in frames {
        out.push(*control);
        message
            .encode_length_delimited(&mut out)
            .expect("a Vec grows");
    }
    out
}
