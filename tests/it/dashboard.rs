//! The Grafana dashboard in deploy/ queries only metrics the worker really exports: every
//! `freeroam_*` series named in a panel query is found in a real worker's `/metrics`, and
//! the panels cover what operators look at.

use crate::common::process::{http_get, signal, wait_ready, worker};
use crate::common::{TestRedis, free_port, unique_prefix};
use std::collections::BTreeSet;

const DASHBOARD: &str = include_str!("../../deploy/grafana/free-roam.json");

/// Each `freeroam_*` metric a PromQL expression names, with its label selector if any.
fn series_in(expr: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("freeroam_") {
        let tail = &rest[at..];
        let name_len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..name_len];
        let after = &tail[name_len..];
        let selector = after
            .strip_prefix('{')
            .and_then(|s| s.find('}').map(|end| s[..end].to_string()));
        found.push((name.to_string(), selector));
        rest = &tail[name_len..];
    }
    found
}

/// The sample lines of a Prometheus text exposition, as (name, labels) pairs.
fn exported(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let series = l.split_whitespace().next().unwrap_or_default();
            match series.split_once('{') {
                Some((name, labels)) => (name.to_string(), labels.trim_end_matches('}').into()),
                None => (series.to_string(), String::new()),
            }
        })
        .collect()
}

#[test]
fn series_in_reads_names_and_selectors() {
    assert_eq!(
        series_in(r#"max(freeroam_queue_jobs{state="waiting"}) / sum(rate(freeroam_x_total[1m]))"#),
        vec![
            (
                "freeroam_queue_jobs".to_string(),
                Some(r#"state="waiting""#.to_string())
            ),
            ("freeroam_x_total".to_string(), None),
        ]
    );
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_the_worker() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a title").to_string();
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has queries");
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expression");
            let series = series_in(expr);
            assert!(
                !series.is_empty(),
                "{title}: {expr} names a free-roam metric"
            );
            queried.extend(series.into_iter().map(|s| (title.clone(), s)));
        }
    }

    let redis = TestRedis::start();
    let port = free_port();
    let mut w = worker(&redis, &unique_prefix(), port, &[]);
    wait_ready(port);
    let (code, text) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    let exported = exported(&text);
    for (title, (name, selector)) in &queried {
        let found = exported.iter().any(|(n, labels)| {
            n == name
                && selector.as_ref().is_none_or(|want| {
                    want.split(',')
                        .all(|pair| labels.split(',').any(|have| have == pair.trim()))
                })
        });
        assert!(
            found,
            "panel {title:?} queries {name}{} which the worker does not export:\n{text}",
            selector
                .as_deref()
                .map(|s| format!("{{{s}}}"))
                .unwrap_or_default()
        );
    }

    // What operators need to see is on the dashboard.
    let names: BTreeSet<&str> = queried.iter().map(|(_, (n, _))| n.as_str()).collect();
    for needed in [
        "freeroam_build_info",
        "freeroam_queue_jobs",
        "freeroam_jobs_running",
        "freeroam_jobs_completed_total",
        "freeroam_jobs_failed_total",
        "freeroam_results_written_total",
        "freeroam_frames_dropped_total",
        "freeroam_inference_batch_size_frames_bucket",
        "freeroam_inference_batch_duration_seconds_bucket",
        "freeroam_result_delay_seconds_bucket",
    ] {
        assert!(names.contains(needed), "the dashboard shows {needed}");
    }
    signal(&w, 15);
    assert!(w.wait().unwrap().success());
}
