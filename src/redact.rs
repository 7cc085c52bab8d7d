//! The one place secrets are masked before anything is shown: a URL's password (Redis
//! URLs, camera URLs) becomes `***` in logs, errors, `/health` and `Debug` output (pure).

use std::fmt;

/// What a masked password is shown as.
pub const MASK: &str = "***";

/// `url` with the password of its user-info part (`scheme://user:password@host`) replaced
/// by [`MASK`]; the user name stays, so a log still says who connected. Anything that is
/// not a URL with a password is returned unchanged. A comma-separated list of URLs (the
/// Cluster's seed nodes) is masked URL by URL.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    // The authority ends at the first '/', '?' or '#'; the user info at its last '@'.
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let user_info = &authority[..at];
    let Some(colon) = user_info.find(':') else {
        return url.to_string();
    };
    format!(
        "{}{}:{MASK}{}",
        &url[..authority_start],
        &user_info[..colon],
        &rest[at..]
    )
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

    #[test]
    fn a_secret_never_prints_its_password() {
        let s = Secret::new("redis://u:hunter2@h:1/0");
        assert_eq!(format!("{s}"), "redis://u:***@h:1/0");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "redis://u:hunter2@h:1/0");
    }
}
