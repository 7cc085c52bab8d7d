//! The one place secrets are masked before anything is shown (pure): a URL's password
//! (Redis URLs, camera URLs) and query values that look like tokens become `***` in logs,
//! errors, `/health` and `Debug` output, and so does every URL in the text a child process
//! prints ([`redact_text`]).

use std::fmt;

/// What a masked password is shown as.
pub const MASK: &str = "***";

/// Query parameter names whose values are secrets whatever they look like (matched as
/// parts of the lower-cased name: `access_token`, `X-Amz-Signature`, `apikey`, ...).
const SECRET_PARAMS: [&str; 9] = [
    "token",
    "key",
    "sig",
    "secret",
    "pass",
    "pwd",
    "auth",
    "credential",
    "session",
];
/// The shortest value taken for a token by its looks alone (letters and digits mixed).
const TOKEN_MIN_CHARS: usize = 20;

/// `url` with the password of its user-info part (`scheme://user:password@host`) replaced
/// by [`MASK`], and so the value of each query parameter that names a secret or looks like
/// a token; the user name stays, so a log still says who connected (unless the user info is
/// a bare token). Anything else is returned unchanged. A comma-separated list of URLs (the
/// Cluster's seed nodes) is masked URL by URL.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

/// `text` (a line a child process printed: ffmpeg names its input URL, password and all,
/// in its errors) with every URL in it masked as [`redact_url`] masks one. A URL runs from
/// its scheme to the next blank or quote.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(separator) = rest.find("://") {
        let start = rest[..separator]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let after = separator + 3;
        let end = rest[after..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map_or(rest.len(), |i| after + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_one(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    // The user info ends at the last '@' before the path. Not at a '?' or '#': a password
    // holding one unencoded is still a password, and tools print such URLs as given.
    let host_part = &rest[..rest.find('/').unwrap_or(rest.len())];
    let (user_info, tail) = match host_part.rfind('@') {
        Some(at) => (mask_user_info(&rest[..at]), &rest[at..]),
        None => (String::new(), rest),
    };
    format!("{}{user_info}{}", &url[..authority_start], mask_query(tail))
}

/// `user:password` keeps the user; a bare user that looks like a token is masked whole.
fn mask_user_info(user_info: &str) -> String {
    match user_info.split_once(':') {
        Some((user, _)) => format!("{user}:{MASK}"),
        None if looks_like_token(user_info) => MASK.to_string(),
        None => user_info.to_string(),
    }
}

/// The host, path, query and fragment after the user info, with secret query values masked.
fn mask_query(tail: &str) -> String {
    let Some(q) = tail.find('?') else {
        return tail.to_string();
    };
    let query_end = tail[q..].find('#').map_or(tail.len(), |i| q + i);
    let params: Vec<String> = tail[q + 1..query_end]
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, value)) if is_secret_param(name, value) => format!("{name}={MASK}"),
            _ => param.to_string(),
        })
        .collect();
    format!("{}{}{}", &tail[..=q], params.join("&"), &tail[query_end..])
}

fn is_secret_param(name: &str, value: &str) -> bool {
    let name = name.to_ascii_lowercase();
    !value.is_empty() && (SECRET_PARAMS.iter().any(|s| name.contains(s)) || looks_like_token(value))
}

/// Long, of URL-safe characters, with letters and digits mixed: an API key, a signature, a
/// JWT, a base64 secret.
fn looks_like_token(value: &str) -> bool {
    value.len() >= TOKEN_MIN_CHARS
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '%' | '+' | '/' | '=')
        })
        && value.chars().any(|c| c.is_ascii_digit())
        && value.chars().any(|c| c.is_ascii_alphabetic())
}

/// A string that holds a secret (a Redis URL with its password): `Debug` and `Display`
/// show it masked, and the real value is read with [`Secret::expose`] (or through `Deref`,
/// for the one call that connects).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the code that must use it (connecting to Redis).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<&str> for Secret {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_the_rest_kept() {
        assert_eq!(
            redact_url("redis://:s3cret@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redact_url("rediss://worker:p%40ss@cache:6380"),
            "rediss://worker:***@cache:6380"
        );
        assert_eq!(
            redact_url("rtsp://cam:a@b@10.0.0.7/live?x=y@z"),
            "rtsp://cam:***@10.0.0.7/live?x=y@z"
        );
        assert_eq!(
            redact_url("redis://a:1@h1:7000,redis://a:1@h2:7001"),
            "redis://a:***@h1:7000,redis://a:***@h2:7001"
        );
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        for url in [
            "redis://cache:6379/0",
            "redis://user@cache:6379",
            "cam:1",
            "http://host/path@x:y",
            "unix:///run/redis.sock",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    /// What ffmpeg prints for a camera that is down or refuses the login names the URL as
    /// given, password and all.
    #[test]
    fn every_url_in_a_childs_words_is_masked() {
        assert_eq!(
            redact_text("[error] rtsp://admin:Pw-1@10.0.0.7:554/cam: Connection refused"),
            "[error] rtsp://admin:***@10.0.0.7:554/cam: Connection refused"
        );
        assert_eq!(
            redact_text(
                "Opening 'https://u:p@cdn/a.ts?X-Amz-Signature=abc&n=3' for reading, \
                 then http://cdn/b.ts?token=t0k and rtsp://v:q@h"
            ),
            "Opening 'https://u:***@cdn/a.ts?X-Amz-Signature=***&n=3' for reading, \
             then http://cdn/b.ts?token=*** and rtsp://v:***@h"
        );
        // A password with an unencoded '?' or '#' is still the password.
        assert_eq!(
            redact_text("rtsp://admin:a?b#c@cam/x: 401"),
            "rtsp://admin:***@cam/x: 401"
        );
        // Tokens by their looks: a bare user that is one, a query value that is one.
        assert_eq!(
            redact_text("https://ghp_0123456789abcdefABCD@git/x?v=eyJhbGciOi9J.x1y2z3w4v5u6"),
            "https://***@git/x?v=***"
        );
        for plain in [
            "[tcp @ 0x1] [error] Connection to tcp://127.0.0.1:1?timeout=2000000 failed",
            "[hls @ 0x1] [info] Opening 'http://cam/seg_17.ts' for reading",
            "no URL here: a://",
            "",
        ] {
            assert_eq!(redact_text(plain), plain);
        }
    }

    #[test]
    fn a_secret_never_prints_its_password() {
        let s = Secret::new("redis://u:hunter2@h:1/0");
        assert_eq!(format!("{s}"), "redis://u:***@h:1/0");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "redis://u:hunter2@h:1/0");
    }
}
