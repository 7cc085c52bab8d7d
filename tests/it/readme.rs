//! The README's flow, run as a newcomer would: its blocks marked `sh tested`, in order, in
//! one bash on a fresh Redis, with the real `free-roam` binary, ffmpeg and redis-cli, and
//! then the redis-cli loop of docs/redis-contract.md that follows a job to its end entry.
//! What each block prints is checked against what the README says it does.

use crate::common::{TestRedis, free_port, temp_dir};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The marker of a fenced block the test runs.
const TESTED: &str = "```sh tested";
/// How long the whole flow may take before the test gives up on it.
const FLOW_TIMEOUT: Duration = Duration::from_secs(240);

/// The bodies of the document's `sh tested` blocks, in order.
fn tested_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find(TESTED) {
        let body = &rest[start + TESTED.len()..];
        let body = body.strip_prefix('\n').unwrap_or(body);
        let end = body.find("\n```").expect("a closed block");
        blocks.push(body[..end].to_string());
        rest = &body[end + 4..];
    }
    blocks
}

/// Sends `signal` to every process of a process group.
fn kill_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .status();
}

/// Runs `script` in bash in its own process group within `dir`; returns its exit code and
/// what it printed. Whatever it left running in the background is stopped afterwards.
fn run_flow(redis: &TestRedis, dir: &std::path::Path, script: &str) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_free-roam"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .env("REDIS_URL", redis.url())
        .env("HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let pgid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > FLOW_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    kill_group(pgid, "-TERM");
    std::thread::sleep(Duration::from_millis(500));
    kill_group(pgid, "-KILL");
    let _ = child.wait();
    let printed = format!(
        "{}\n--- stderr ---\n{}",
        out.join().unwrap(),
        err.join().unwrap()
    );
    (code, printed)
}

/// What block `i` printed, between its marker and the next.
fn block_output(printed: &str, i: usize) -> &str {
    let marker = format!("@@block {i}\n");
    let start = printed.find(&marker).map(|s| s + marker.len());
    let Some(start) = start else {
        return "";
    };
    let end = printed[start..]
        .find("@@block ")
        .map_or(printed.len(), |e| start + e);
    &printed[start..end]
}

#[test]
fn the_readme_flow_does_what_the_readme_says() {
    let readme = tested_blocks(include_str!("../../README.md"));
    let contract = tested_blocks(include_str!("../../docs/redis-contract.md"));
    assert_eq!(readme.len(), 6, "the README's tested blocks: {readme:#?}");
    assert_eq!(contract.len(), 1, "the contract's follow loop");
    let redis = TestRedis::start();
    let dir = temp_dir("readme");
    let mut script = format!(
        "set -euo pipefail\nredis-cli() {{ command redis-cli -p {} \"$@\"; }}\n",
        redis.port
    );
    for (i, block) in readme.iter().chain(&contract).enumerate() {
        script.push_str(&format!("echo '@@block {i}'\n{block}\n"));
    }
    let (code, printed) = run_flow(&redis, &dir, &script);
    let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
    let printed = format!("{printed}\n--- worker.log ---\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(0), "the flow ran to its end:\n{printed}");
    let out = |i| block_output(&printed, i);

    // Set the prompt, push a job.
    assert!(out(1).starts_with("1\n"), "prompt set prints 1:\n{printed}");
    // Watch it: the job follows the active prompt, its first results are v1.
    assert!(
        out(2).contains("follows the active prompt"),
        "status says how the job gets its prompt:\n{}",
        out(2)
    );
    let first: Vec<&str> = out(2).lines().filter(|l| l.starts_with("frame")).collect();
    assert_eq!(first.len(), 3, "three results:\n{}", out(2));
    assert!(first.iter().all(|l| l.contains(" v1 ")), "{first:?}");
    assert!(
        out(3).contains("{fr:lobby-1}:results"),
        "XREAD names the stream:\n{}",
        out(3)
    );
    // Change the prompt: version 2, and the job's next results carry it.
    assert!(out(4).starts_with("2\n"), "FCALL prints 2:\n{}", out(4));
    let next: Vec<&str> = out(4).lines().filter(|l| l.starts_with("frame")).collect();
    assert_eq!(next.len(), 4, "{}", out(4));
    assert!(
        next.last().unwrap().contains(" v2 "),
        "the change arrives in the job's results:\n{}",
        out(4)
    );
    assert!(
        out(4).contains("Detect only vehicles"),
        "the history lists it"
    );
    // Cancel: the job stops, `jobs` lists it; the contract's loop follows it to its end.
    assert!(out(5).contains("lobby-1: cancel"), "{}", out(5));
    assert!(
        out(5).starts_with("lobby-1: ") && out(5).contains("JOB"),
        "{}",
        out(5)
    );
    let end = out(6);
    assert!(
        end.contains("\nkind\nend\n") && end.contains("cancelled"),
        "the loop ends at the end entry:\n{end}"
    );
}
