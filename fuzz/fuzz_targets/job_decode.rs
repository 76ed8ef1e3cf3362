//! The relay's job decoder on arbitrary bytes from the queue: never a
//! panic, the same answer as the tagged enum's own decoder (which the fast
//! path for version 1 stands in for), and whatever decodes re-encodes to
//! the same job.
#![no_main]

use herald_shared::Job;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = Job::decode(data).ok();
    let tagged = serde_json::from_slice::<Job>(data).ok();
    assert_eq!(decoded, tagged, "the fast path and the tagged decoder disagree");
    if let Some(job) = decoded {
        let again = Job::decode(&job.encode()).expect("a decoded job re-encodes");
        assert_eq!(again, job);
        let _ = herald_relay::xmpp::stanza::message(&job);
    }
});
