//! ALLOWED_STREAM_HOSTS: the host patterns a network stream may be fetched from, parsed once
//! at start into a matcher, and the one reading of a URL's host and port that every check
//! uses (it splits the authority the way ffmpeg does, so the host checked is the host ffmpeg
//! connects to). Pure, so every rule is unit-tested.
//!
//! A pattern is a host name (`cam1.example.com`), a name under a domain (`*.example.com`:
//! any depth below it, not the domain itself), an IPv4 address, or an IPv6 address in
//! brackets (`[fd00::5]`), each optionally with `:port` (without one, any port). Names match
//! without regard to case or a trailing dot. Names are matched as written in the URL, not
//! the addresses they resolve to.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The setting that owns these patterns, named in every refusal.
pub const SETTING: &str = "ALLOWED_STREAM_HOSTS";

/// The host part of a pattern or URL, normalised for comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    /// Lowercase, without a trailing dot.
    Name(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

impl Host {
    /// Reads a host as it appears in a URL or pattern (`[..]` around IPv6).
    fn parse(text: &str) -> Result<Self, String> {
        if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            return inner
                .parse()
                .map(Host::V6)
                .map_err(|_| format!("`{text}` is not an IPv6 address"));
        }
        if let Ok(v4) = text.parse::<Ipv4Addr>() {
            return Ok(Host::V4(v4));
        }
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("`{text}` is not a host name or address"));
        }
        Ok(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// One pattern of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    /// `*.domain`: any name below `domain` (stored as `.domain`).
    suffix: Option<String>,
    /// An exact host (when `suffix` is `None`).
    host: Option<Host>,
    port: Option<u16>,
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let (host_text, port) = split_host_port(text)?;
        if let Some(domain) = host_text.strip_prefix("*.") {
            return match Host::parse(domain)? {
                Host::Name(name) => Ok(Pattern {
                    suffix: Some(format!(".{name}")),
                    host: None,
                    port,
                }),
                _ => Err(format!(
                    "`{text}`: a wildcard goes only before a domain name"
                )),
            };
        }
        if host_text.contains('*') {
            return Err(format!(
                "`{text}`: `*` is allowed only as the whole first label (`*.example.com`)"
            ));
        }
        Ok(Pattern {
            suffix: None,
            host: Some(Host::parse(host_text)?),
            port,
        })
    }

    fn matches(&self, host: &Host, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.suffix, &self.host, host) {
            (Some(suffix), _, Host::Name(name)) => name.ends_with(suffix.as_str()),
            (None, Some(want), got) => want == got,
            _ => false,
        }
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn split_host_port(text: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = || format!("`{text}` has a bad port");
    let (host, port) = if text.starts_with('[') {
        let end = text
            .find(']')
            .ok_or_else(|| format!("`{text}` lacks its `]`"))?;
        match &text[end + 1..] {
            "" => (&text[..=end], None),
            rest => (
                &text[..=end],
                Some(rest.strip_prefix(':').ok_or_else(bad_port)?),
            ),
        }
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| bad_port())?)
        }
        Some(_) => return Err(bad_port()),
    };
    Ok((host, port))
}

/// The parsed ALLOWED_STREAM_HOSTS; empty allows every host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    patterns: Vec<Pattern>,
}

/// A URL's host refused by the list (or a URL whose host cannot be read).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostRefused(pub String);

impl AllowedHosts {
    /// Parses a comma-separated list; blanks around patterns are ignored.
    pub fn parse(list: &str) -> Result<Self, String> {
        let patterns = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Pattern::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// No patterns: every host is allowed (and nothing needs checking).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `url` (`scheme://[user@]host[:port]/...`) may be fetched. The refusal names
    /// the host and port, and the setting.
    pub fn check_url(&self, url: &str) -> Result<(), HostRefused> {
        if self.is_empty() {
            return Ok(());
        }
        let (host, port) = url_host(url).map_err(HostRefused)?;
        if self.patterns.iter().any(|p| p.matches(&host, port)) {
            Ok(())
        } else {
            Err(HostRefused(format!(
                "host `{}` is not in {SETTING}",
                host_port(&host, port)
            )))
        }
    }
}

fn host_port(host: &Host, port: u16) -> String {
    format!("{host}:{port}")
}

/// The port a scheme uses when the URL names none.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        "rtsp" => Some(554),
        "rtsps" => Some(322),
        _ => None,
    }
}

/// A URL's host and port, split as ffmpeg's `av_url_split` does: the authority ends at the
/// first `/`, `?` or `#`, and user information runs to its last `@`. Unlike ffmpeg, a port
/// that is not a number is an error rather than read as far as it is digits.
fn url_host(url: &str) -> Result<(Host, u16), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "the URL has no `scheme://`".to_string())?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port_text = authority.rsplit('@').next().unwrap_or(authority);
    let (host_text, port) = split_host_port(host_port_text)?;
    let port = port
        .or_else(|| default_port(&scheme))
        .ok_or_else(|| format!("the URL names no port and `{scheme}` has no default"))?;
    Ok((Host::parse(host_text)?, port))
}

/// `host:port` of `url`, for messages (the URL as given when its host cannot be read).
pub fn describe_host(url: &str) -> String {
    match url_host(url) {
        Ok((host, port)) => host_port(&host, port),
        Err(_) => crate::redact::redact_url(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> AllowedHosts {
        AllowedHosts::parse(s).unwrap()
    }

    fn ok(l: &AllowedHosts, url: &str) -> bool {
        l.check_url(url).is_ok()
    }

    #[test]
    fn an_empty_list_allows_everything() {
        for s in ["", " ", " , ,"] {
            let l = list(s);
            assert!(l.is_empty());
            assert!(ok(&l, "http://anything.example/x.m3u8"));
            assert!(ok(&l, "not even a url"));
        }
    }

    #[test]
    fn names_match_without_case_or_trailing_dot_and_ports_narrow() {
        let l = list("Cam1.Example.com, 10.0.0.5:8080");
        assert!(ok(&l, "http://cam1.example.COM/live.m3u8"));
        assert!(ok(&l, "rtsp://cam1.example.com.:8554/s"));
        assert!(ok(&l, "http://10.0.0.5:8080/a.m3u8"));
        assert!(!ok(&l, "http://10.0.0.5/a.m3u8"), "port 80 is not 8080");
        assert!(!ok(&l, "http://10.0.0.6:8080/a.m3u8"));
        assert!(!ok(&l, "http://cam1.example.com.evil.net/a.m3u8"));
        assert!(!ok(&l, "http://xcam1.example.com/a.m3u8"));
        let e = l.check_url("http://other.net:81/x").unwrap_err().0;
        assert_eq!(e, "host `other.net:81` is not in ALLOWED_STREAM_HOSTS");
    }

    #[test]
    fn default_ports_come_from_the_scheme() {
        let l = list("a.example:443,b.example:554,c.example:80");
        assert!(ok(&l, "https://a.example/x"));
        assert!(ok(&l, "RTSP://b.example/x"));
        assert!(ok(&l, "http://c.example"));
        assert!(!ok(&l, "http://a.example/x"));
    }

    #[test]
    fn a_wildcard_is_a_whole_leading_label_and_covers_names_below_only() {
        let l = list("*.example.com");
        assert!(ok(&l, "http://a.example.com/x"));
        assert!(ok(&l, "http://a.b.example.com:9000/x"));
        assert!(!ok(&l, "http://example.com/x"), "not the domain itself");
        assert!(!ok(&l, "http://badexample.com/x"));
        assert!(!ok(&l, "http://10.0.0.1/x"));
        for bad in [
            "*",
            "a*.example.com",
            "a.*.com",
            "*.10.0.0.1",
            "*.[::1]",
            "*example.com",
        ] {
            assert!(AllowedHosts::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_goes_in_brackets_and_compares_as_an_address() {
        let l = list("[fd00::5], [::1]:8080");
        assert!(ok(&l, "http://[fd00:0::5]/x"));
        assert!(ok(&l, "rtsp://[FD00::5]:554/x"));
        assert!(ok(&l, "http://[::1]:8080/x"));
        assert!(!ok(&l, "http://[::1]/x"));
        assert!(!ok(&l, "http://[fd00::6]/x"));
        for bad in ["fd00::5", "[fd00::5", "[nothex]", "[::1]8080", "[::1]:"] {
            assert!(AllowedHosts::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "http://a.example",
            "a.example/path",
            "a..example",
            "a.example:99999",
            "a.example:8o",
            "a b",
        ] {
            assert!(AllowedHosts::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_host_is_read_as_ffmpeg_reads_it() {
        let l = list("good.example");
        // User information ends at the last `@` of the authority.
        assert!(ok(&l, "rtsp://user:p@ss@good.example/s"));
        assert!(!ok(&l, "http://good.example@evil.example/x"));
        // The authority ends at `/`, `?` or `#`, so these all go to evil.example.
        assert!(!ok(&l, "http://evil.example?@good.example/x"));
        assert!(!ok(&l, "http://evil.example#@good.example/x"));
        // Hosts that are not names or addresses, or ports that are not numbers.
        assert!(!ok(&l, "http://good.example:80x/x"));
        assert!(!ok(&l, "http://good%2eexample/x"));
        assert!(!ok(&l, "good.example/x"), "no scheme");
        assert!(!ok(&l, "ftp://good.example/x"), "no default port for ftp");
        assert_eq!(
            describe_host("http://User@Good.Example/x"),
            "good.example:80"
        );
    }
}
