//! Signal frames: arbitrary bytes as a binary (protobuf) frame and as a text (protojson) frame.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = arbor_actors::codec::decode_signal_binary(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = arbor_actors::codec::decode_signal_text(text);
    }
});
