//! Data-channel packets: decode, stamp with the sender, re-encode.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = arbor_actors::codec::stamp_data_packet(data, 64 * 1024, "alice", "PA_fuzz", false);
});
