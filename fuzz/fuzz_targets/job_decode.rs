//! The relay's job decoder on arbitrary bytes from the queue: never a
//! panic, and whatever decodes re-encodes to the same job.
#![no_main]

use herald_shared::Job;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = Job::decode(data) {
        let again = Job::decode(&job.encode()).expect("a decoded job re-encodes");
        assert_eq!(again, job);
        let _ = herald_relay::xmpp::stanza::message(&job);
    }
});
