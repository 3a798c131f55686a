//! Room, participant and track actors (control) and the media data plane (packets).
