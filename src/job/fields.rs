//! Reading a job entry's fields: the raw entry decoded into named values, then each field
//! read with its check, so that a refused value is reported under its field's name.

use super::{JobField, MAX_JOB_FIELDS, SpecError};
use std::collections::BTreeMap;
use std::str::FromStr;

/// A job entry's values by field name, as decoded from the raw entry.
pub struct EntryFields {
    values: BTreeMap<String, String>,
    /// Things the producer should know about but that did not stop the job.
    pub warnings: Vec<String>,
}

impl EntryFields {
    /// Decodes raw entry fields. Besides the values that decoded, returns the first thing
    /// wrong with the entry as a whole (too many fields, a name or value that is not UTF-8):
    /// the caller still reads the job id before reporting it, to file it under that id.
    pub fn decode(fields: &[(Vec<u8>, Vec<u8>)]) -> (Self, Option<SpecError>) {
        let mut entry = EntryFields {
            values: BTreeMap::new(),
            warnings: Vec::new(),
        };
        let mut first_error = (fields.len() > MAX_JOB_FIELDS).then(|| {
            SpecError::other(
                "entry",
                format!(
                    "has {} fields; at most {MAX_JOB_FIELDS} are allowed",
                    fields.len()
                ),
            )
        });
        for (name, value) in fields {
            let Ok(name) = std::str::from_utf8(name) else {
                first_error.get_or_insert(SpecError::other(
                    &String::from_utf8_lossy(name),
                    "field name is not valid UTF-8",
                ));
                continue;
            };
            let Ok(value) = std::str::from_utf8(value) else {
                first_error.get_or_insert(SpecError::other(name, "value is not valid UTF-8"));
                continue;
            };
            if entry
                .values
                .insert(name.to_string(), value.to_string())
                .is_some()
            {
                entry
                    .warnings
                    .push(format!("field `{name}` given twice; the last one counts"));
            }
        }
        (entry, first_error)
    }

    /// The field's value as given, `None` when the entry lacks it.
    pub fn raw(&self, field: JobField) -> Option<&str> {
        self.values.get(field.name()).map(String::as_str)
    }

    /// A field the entry must carry.
    pub fn required(&self, field: JobField) -> Result<&str, SpecError> {
        self.raw(field)
            .ok_or_else(|| SpecError::new(field, "is required"))
    }

    /// An optional field read by `check`, which returns the value or why it is refused.
    pub fn checked<T>(
        &self,
        field: JobField,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, SpecError> {
        self.raw(field)
            .map(check)
            .transpose()
            .map_err(|reason| SpecError::new(field, reason))
    }

    /// An optional field read by `accept`; a value it refuses is reported as "`expected`,
    /// got `value`".
    pub fn parsed<T>(
        &self,
        field: JobField,
        expected: &str,
        accept: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, SpecError> {
        self.checked(field, |raw| {
            accept(raw).ok_or_else(|| format!("{expected}, got `{raw}`"))
        })
    }

    /// An optional number (surrounding blanks ignored) that must satisfy `in_range`.
    pub fn number<T: FromStr>(
        &self,
        field: JobField,
        expected: &str,
        in_range: impl FnOnce(&T) -> bool,
    ) -> Result<Option<T>, SpecError> {
        self.parsed(field, expected, |raw| {
            raw.trim().parse::<T>().ok().filter(in_range)
        })
    }

    /// An optional `on`/`off` field (any case, surrounding blanks ignored).
    pub fn on_off(&self, field: JobField) -> Result<Option<bool>, SpecError> {
        self.checked(field, |raw| {
            match raw.trim().to_ascii_lowercase().as_str() {
                "on" => Ok(true),
                "off" => Ok(false),
                other => Err(format!("must be `on` or `off`, got `{other}`")),
            }
        })
    }

    /// The fields the contract does not know, with their values as given.
    pub fn unknown(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .filter(|(name, _)| JobField::parse(name).is_none())
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }
}
