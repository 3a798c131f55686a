//! SDP and trickle candidates: our section reader, str0m's parser, trickle JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = arbor_actors::media::sdp::media_sections(&text);
    let _ = arbor_actors::media::sdp::candidate_from_init(&text);
    let _ = str0m::change::SdpOffer::from_sdp_string(&text);
    let _ = str0m::change::SdpAnswer::from_sdp_string(&text);
});
