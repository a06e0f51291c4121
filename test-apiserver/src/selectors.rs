//! Label and field selectors (`labelSelector=`, `fieldSelector=`) as kubectl and informers send
//! them: equality-based terms (`k=v`, `k==v`, `k!=v`) and, for labels, existence (`k`, `!k`).
//! Set-based label terms (`k in (a,b)`) are refused with 400 rather than misread.

use serde_json::Value;

use crate::response::ApiError;

/// One selector term.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed pair of selectors; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    labels: Vec<Term>,
    fields: Vec<Term>,
}

fn parse_terms(text: &str, labels: bool) -> Result<Vec<Term>, ApiError> {
    let mut out = Vec::new();
    for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let term = if let Some((k, v)) = raw.split_once("!=") {
            Term::Ne(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
            Term::Eq(k.trim().to_owned(), v.trim().to_owned())
        } else if labels && !raw.contains(' ') && !raw.contains('(') {
            match raw.strip_prefix('!') {
                Some(k) => Term::Absent(k.trim().to_owned()),
                None => Term::Exists(raw.to_owned()),
            }
        } else {
            return Err(ApiError::bad_request(format!(
                "unable to parse requirement: {raw:?} (the test API server supports =, == and != terms)"
            )));
        };
        out.push(term);
    }
    Ok(out)
}

impl Selector {
    /// From `labelSelector` and `fieldSelector` query values (either may be empty).
    pub(crate) fn parse(labels: &str, fields: &str) -> Result<Selector, ApiError> {
        Ok(Selector {
            labels: parse_terms(labels, true)?,
            fields: parse_terms(fields, false)?,
        })
    }

    /// Whether `object` matches every term.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let label = |k: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
        };
        let labels_ok = self.labels.iter().all(|t| match t {
            Term::Eq(k, v) => label(k) == Some(v.as_str()),
            Term::Ne(k, v) => label(k) != Some(v.as_str()),
            Term::Exists(k) => label(k).is_some(),
            Term::Absent(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|t| match t {
            Term::Eq(k, v) => field(object, k) == *v,
            Term::Ne(k, v) => field(object, k) != *v,
            Term::Exists(_) | Term::Absent(_) => true,
        });
        labels_ok && fields_ok
    }
}

/// A field by its dotted path (`spec.nodeName`), as text; absent is "".
fn field(object: &Value, path: &str) -> String {
    let pointer: String = path.split('.').map(|p| format!("/{p}")).collect();
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_and_field_terms() {
        let pod = json!({"metadata": {"name": "p", "labels": {"app": "web"}},
                         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |l: &str, f: &str| Selector::parse(l, f).expect("parse").matches(&pod);
        assert!(m("", ""));
        assert!(m("app=web", "metadata.name=p"));
        assert!(m(
            "app==web,!tier",
            "spec.nodeName=n1,status.phase!=Succeeded"
        ));
        assert!(!m("app!=web", ""));
        assert!(!m("tier", ""));
        assert!(!m("", "spec.nodeName=n2"));
        assert!(Selector::parse("app in (a,b)", "").is_err());
    }
}
