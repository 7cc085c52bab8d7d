//! The model's error: which kind of failure it is (the weights, the prompt, a batch), for the
//! worker to act on, what was being done, and the library error behind it, kept as its source
//! rather than flattened into text.

use std::fmt;

/// A model failure. `batch` errors fail every frame of the batch; the worker goes on.
///
/// Its text is one line: the kind, what was being done, then the cause, as in
/// `model weights: cannot read config.json: No such file or directory`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model cannot be loaded: its files, config, weights, tokenizer or device.
    #[error("model weights: {0}")]
    Load(#[source] ErrorDetail),
    /// The prompt does not suit the model.
    #[error("bad prompt: {0}")]
    Prompt(#[source] ErrorDetail),
    /// A batch failed on its way through the model.
    #[error("inference failed: {0}")]
    Inference(#[source] ErrorDetail),
}

impl ModelError {
    /// A load failure: `cause` came while doing `what`.
    pub fn load(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Load(ErrorDetail::new(what, cause))
    }

    /// A prompt failure: `cause` came while doing `what`.
    pub fn prompt(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Prompt(ErrorDetail::new(what, cause))
    }

    /// An inference failure: `cause` came while doing `what`.
    pub fn inference(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Inference(ErrorDetail::new(what, cause))
    }

    /// What failed and why, whatever the kind.
    pub fn detail(&self) -> &ErrorDetail {
        match self {
            Self::Load(detail) | Self::Prompt(detail) | Self::Inference(detail) => detail,
        }
    }
}

/// A tensor operation failing while a batch runs: the network's own errors are inference
/// failures (loading names its candle errors itself, with [`ModelError::load`]).
impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Inference(ErrorDetail::from_cause(e))
    }
}

/// What failed: what was being done (`cannot read config.json`), and the library error that
/// caused it, if one did (boxed: some are large, and every model call returns this type).
#[derive(Debug)]
pub struct ErrorDetail {
    what: String,
    cause: Option<Box<Cause>>,
}

impl ErrorDetail {
    /// `cause` came while doing `what`.
    pub fn new(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self {
            what: what.into(),
            cause: Some(Box::new(cause.into())),
        }
    }

    /// A library error that speaks for itself.
    pub fn from_cause(cause: impl Into<Cause>) -> Self {
        Self::new(String::new(), cause)
    }

    /// The same failure, seen from `outer`: its text becomes `outer: what: cause`.
    pub fn within(self, outer: impl fmt::Display) -> Self {
        let what = if self.what.is_empty() {
            outer.to_string()
        } else {
            format!("{outer}: {}", self.what)
        };
        Self { what, ..self }
    }

    /// The library error behind it, if any.
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_deref()
    }
}

/// A failure without a library error behind it: the text says it all.
impl From<String> for ErrorDetail {
    fn from(what: String) -> Self {
        Self { what, cause: None }
    }
}

impl From<&str> for ErrorDetail {
    fn from(what: &str) -> Self {
        what.to_string().into()
    }
}

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.cause, self.what.is_empty()) {
            (None, _) => f.write_str(&self.what),
            (Some(cause), true) => write!(f, "{cause}"),
            (Some(cause), false) => write!(f, "{}: {cause}", self.what),
        }
    }
}

impl std::error::Error for ErrorDetail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|c| c as _)
    }
}

/// The library error behind an [`ErrorDetail`], by the library it came from.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The `tokenizers` crate's (a boxed error).
    #[error(transparent)]
    Tokenizer(tokenizers::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// JSON that does not parse, or does not have the shape asked for.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error(transparent)]
    Hub(#[from] hf_hub::api::sync::ApiError),
    /// A remote model's server or the way to it (`remote::openai`'s error, boxed).
    #[error(transparent)]
    Remote(Box<dyn std::error::Error + Send + Sync>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn the_text_is_one_line_and_the_cause_stays_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = ModelError::load("cannot read config.json", io);
        assert_eq!(
            e.to_string(),
            "model weights: cannot read config.json: no such file"
        );
        let detail = e.source().unwrap();
        let cause = detail.source().unwrap();
        assert!(cause.downcast_ref::<Cause>().is_some());
        assert!(matches!(e.detail().cause(), Some(Cause::Io(_))));
    }

    #[test]
    fn texts_alone_and_causes_alone_read_plainly() {
        let e = ModelError::Inference("out of memory".into());
        assert_eq!(e.to_string(), "inference failed: out of memory");
        assert!(e.detail().cause().is_none());
        let candle = candle_core::Error::Msg("shape mismatch".into());
        let e = ModelError::from(candle);
        assert_eq!(e.to_string(), "inference failed: shape mismatch");
        assert!(matches!(e.detail().cause(), Some(Cause::Candle(_))));
    }

    #[test]
    fn the_error_stays_small_for_every_call_that_returns_it() {
        assert!(std::mem::size_of::<ModelError>() <= 48);
    }

    #[test]
    fn a_failure_seen_from_outside_keeps_its_cause() {
        let io = std::io::Error::other("refused");
        let f = ErrorDetail::new("config.json", io).within("the hub said");
        assert_eq!(f.to_string(), "the hub said: config.json: refused");
        assert!(matches!(f.cause(), Some(Cause::Io(_))));
    }
}
