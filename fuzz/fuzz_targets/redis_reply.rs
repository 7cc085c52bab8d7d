//! Fuzzes the parsing of Redis replies: bytes read as RESP, then every reader of the
//! `freeroam` functions' replies and of stream-read replies, and the job entries those
//! carry through the job parser.
#![no_main]
use free_roam::store::functions::ClaimVerdict;
use free_roam::fuzzing::function_replies;
use free_roam::job::JobSpec;
use free_roam::queue::entries::{parse_entry_list, parse_read_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (jobs, resp) = data.split_first().unwrap_or((&0, &[]));
    let Ok(reply) = redis::parse_redis_value(resp) else {
        return;
    };
    let jobs = usize::from(*jobs % 8);
    let r = function_replies(&reply, jobs);
    if let ClaimVerdict::Final { status, .. } = r.claim {
        assert!(status.is_terminal());
    }
    if let Ok(leases) = &r.leases {
        assert_eq!(leases.len(), jobs);
    }
    if let Ok(end) = r.end {
        assert!(end.status.is_terminal());
    }
    let claimed = parse_entry_list(&reply);
    for entry in parse_read_reply(&reply).into_iter().chain(claimed) {
        let _ = JobSpec::parse(&entry.id, &entry.fields, 2.0, || "generated".into());
    }
    let _ = redis::from_redis_value::<redis::streams::StreamReadReply>(reply);
});
