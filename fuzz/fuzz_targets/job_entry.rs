//! Fuzzes the job entry parser (`JobSpec::parse`) with arbitrary field names and values,
//! any of which may be stretched to 1 MiB.
#![no_main]
use free_roam::job::{JobSpec, validate_job_id, validate_stream_ref};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    entry_id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Stretches one field's value to this many bytes (at most 1 MiB) by repeating it.
    stretch: Option<(u8, u32)>,
}

fuzz_target!(|input: Input| {
    let mut fields = input.fields;
    if let Some((which, len)) = input.stretch
        && !fields.is_empty()
    {
        let i = usize::from(which) % fields.len();
        let len = (len as usize) % (1 << 20 | 1);
        let v = &mut fields[i].1;
        if !v.is_empty() {
            *v = v.iter().copied().cycle().take(len).collect();
        }
    }
    match JobSpec::parse(&input.entry_id, &fields, 2.0, || "generated".to_string()) {
        Ok(spec) => {
            // Whatever is accepted must pass the rules the parser promises.
            assert!(spec.job_id == "generated" || validate_job_id(&spec.job_id).is_ok());
            assert!(validate_stream_ref(&spec.stream_ref).is_ok());
            assert!(spec.fps.is_finite() && spec.fps > 0.0);
            let _ = spec.hash_fields();
        }
        Err((e, id)) => {
            assert!(!e.to_string().is_empty());
            if let Some(id) = id {
                assert!(validate_job_id(&id).is_ok());
            }
        }
    }
});
