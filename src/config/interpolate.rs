//! `${VAR}` and `${VAR:-default}` substitution from the environment, applied to
//! the raw text of a config file before it is parsed.

/// Replaces every `${NAME}` in `text` through `lookup`. `${NAME:-fallback}` uses
/// the fallback when the variable is unset or empty; `$${` writes a literal `${`.
/// An unset variable without a fallback is an error that names it and its line.
pub(crate) fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let line = text.len() - rest.len() + start;
        let line = text[..line].matches('\n').count() + 1;
        let body_start = start + 2;
        let end = rest[body_start..]
            .find('}')
            .ok_or_else(|| format!("line {line}: `${{` without a closing `}}`"))?;
        let body = &rest[body_start..body_start + end];
        let (name, fallback) = match body.split_once(":-") {
            Some((name, fallback)) => (name, Some(fallback)),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "line {line}: `${{{body}}}` is not a valid variable name"
            ));
        }
        match (lookup(name).filter(|v| !v.is_empty()), fallback) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(fallback)) => out.push_str(fallback),
            (None, None) => {
                return Err(format!(
                    "line {line}: environment variable `{name}` is not set"
                ));
            }
        }
        rest = &rest[body_start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::interpolate;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_set_variables_and_fallbacks() {
        assert_eq!(interpolate("a=${SECRET}!", env).unwrap(), "a=s3cr3t!");
        assert_eq!(interpolate("${NOPE:-dflt}", env).unwrap(), "dflt");
        assert_eq!(interpolate("${EMPTY:-dflt}", env).unwrap(), "dflt");
        assert_eq!(
            interpolate("cost $5, $${SECRET}", env).unwrap(),
            "cost $5, ${SECRET}"
        );
    }

    #[test]
    fn unset_variable_is_an_error_naming_it() {
        let err = interpolate("x = 1\ny = \"${MISSING_VAR}\"", env).unwrap_err();
        assert!(err.contains("MISSING_VAR"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(interpolate("${bad name}", env).is_err());
        assert!(interpolate("${OPEN", env).is_err());
    }
}
