//! Chat templates with Hugging Face semantics, rendered by minijinja.
//!
//! Like transformers' `apply_chat_template`: blocks are trimmed
//! (`trim_blocks`, `lstrip_blocks`), the context holds `messages`,
//! `add_generation_prompt`, `tools` (none when absent), `documents`, the
//! special tokens, plus caller extras; `raise_exception(msg)` aborts with
//! msg; `tojson` writes Python's `json.dumps` layout (`", "` and `": "`,
//! non-ASCII kept, keys in insertion order); `strftime_now(fmt)` formats
//! the current UTC time. Python string/dict methods (`.strip()`,
//! `.startswith()`, `.items()` ...) come from minijinja-contrib's pycompat.

use std::path::Path;

use minijinja::value::{Kwargs, Serde, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::Value;

use crate::error::{ModelError, Result};

const TEMPLATE_NAME: &str = "chat";
/// Prefix marking errors raised by the template itself.
const RAISE_MARKER: &str = "\u{1}raise_exception:";

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    extra_tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// Per-call inputs beyond the messages.
#[derive(Debug, Clone, Default)]
pub struct ChatRenderOptions {
    pub add_generation_prompt: bool,
    /// Tool schemas, passed through as `tools`.
    pub tools: Option<Value>,
    /// Documents for RAG templates, passed through as `documents`.
    pub documents: Option<Value>,
    /// Extra template variables (e.g. `enable_thinking`), like
    /// transformers' `**kwargs`.
    pub extra: serde_json::Map<String, Value>,
}

fn template_error(e: JError) -> ModelError {
    if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISE_MARKER)) {
        return ModelError::TemplateException(msg.to_string());
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    ModelError::ChatTemplate(msg)
}

/// transformers' `{% generation %}...{% endgeneration %}` extension (it
/// marks assistant tokens for training masks and renders its body as is),
/// which minijinja does not know: each tag becomes `{% if true %}` /
/// `{% endif %}` with the tag's own whitespace control kept.
fn generation_blocks_as_ifs(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{left} if true {right}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{left} endif {right}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

impl ChatTemplate {
    /// Compile `source`. Syntax errors are reported here, not at render time.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, JError> {
                Err(JError::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISE_MARKER}{msg}"),
                ))
            },
        );
        env.add_filter("tojson", tojson_filter);
        env.add_function(
            "strftime_now",
            |fmt: String| -> std::result::Result<JValue, JError> {
                Ok(JValue::from(strftime_utc(&fmt, now_unix())))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, generation_blocks_as_ifs(&source))
            .map_err(template_error)?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
            extra_tokens: Vec::new(),
        })
    }

    /// Also expose other special tokens (`unk_token`, `pad_token`) by name.
    pub fn with_token(mut self, name: &str, value: Option<&str>) -> Self {
        if let Some(v) = value {
            self.extra_tokens.push((name.to_string(), v.to_string()));
        }
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages` (each a JSON object; `content` a string or a list
    /// of parts, passed through untouched).
    pub fn render(&self, messages: &[Value], opts: &ChatRenderOptions) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.extra_tokens {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::String(b.clone()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::String(e.clone()));
        }
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(opts.add_generation_prompt),
        );
        ctx.insert("tools".into(), opts.tools.clone().unwrap_or(Value::Null));
        ctx.insert(
            "documents".into(),
            opts.documents.clone().unwrap_or(Value::Null),
        );
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        tmpl.render(JValue::from(Serde(&ctx)))
            .map_err(template_error)
    }
}

/// Where a model's chat template comes from, in priority order: an explicit
/// override (a file path, or the template itself), `chat_template.jinja`,
/// `chat_template.json`, `tokenizer_config.json` (`chat_template` as a
/// string, or a list of `{name, template}` from which `default` is used),
/// then a GGUF file's `tokenizer.chat_template`.
pub fn resolve_template_source(
    override_: Option<&str>,
    model_dir: Option<&Path>,
    tokenizer_config: Option<&Value>,
    gguf_template: Option<&str>,
) -> Result<Option<String>> {
    if let Some(o) = override_ {
        let p = Path::new(o);
        if p.is_file() {
            return std::fs::read_to_string(p)
                .map(Some)
                .map_err(|e| ModelError::io(p, e));
        }
        if o.contains("{{") || o.contains("{%") {
            return Ok(Some(o.to_string()));
        }
        return Err(ModelError::ChatTemplate(format!(
            "chat template override {o:?} is neither an existing file nor a Jinja template"
        )));
    }
    if let Some(dir) = model_dir {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja)
                .map(Some)
                .map_err(|e| ModelError::io(&jinja, e));
        }
        let json_path = dir.join("chat_template.json");
        if json_path.is_file() {
            let v = crate::tokenizer::read_json(&json_path, "chat_template.json")?;
            if let Some(t) = template_from_value(v.get("chat_template"))? {
                return Ok(Some(t));
            }
        }
    }
    if let Some(cfg) = tokenizer_config {
        if let Some(t) = template_from_value(cfg.get("chat_template"))? {
            return Ok(Some(t));
        }
    }
    Ok(gguf_template.map(str::to_string))
}

fn template_from_value(v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut names = Vec::new();
            for it in items {
                let name = it.get("name").and_then(|n| n.as_str()).unwrap_or("");
                if name == "default" {
                    if let Some(t) = it.get("template").and_then(|t| t.as_str()) {
                        return Ok(Some(t.to_string()));
                    }
                }
                names.push(name.to_string());
            }
            Err(ModelError::ChatTemplate(format!(
                "chat_template lists named templates {names:?} but none is called \"default\""
            )))
        }
        Some(other) => Err(ModelError::ChatTemplate(format!(
            "chat_template must be a string or a list of {{name, template}}, got {other}"
        ))),
    }
}

// ------------------------------------------------------------------ tojson

fn tojson_filter(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, JError> {
    let indent: Option<JValue> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // transformers accepts these; they do not change our output.
    let _: Option<JValue> = kwargs.get("ensure_ascii")?;
    let _: Option<JValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v).map_err(|_| {
            JError::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an integer",
            )
        })?),
    };
    let json: Value = serde_json::to_value(&value)
        .map_err(|e| JError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_py_json(&mut out, &json, indent, 0, sort_keys.unwrap_or(false));
    // Marked safe: chat templates render text, no HTML escaping applies.
    Ok(JValue::from_safe_string(out))
}

/// `json.dumps(v, ensure_ascii=False, indent=indent, sort_keys=...)`.
fn write_py_json(out: &mut String, v: &Value, indent: Option<usize>, depth: usize, sort: bool) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(out, it, indent, depth + 1, sort);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(out, val, indent, depth + 1, sort);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) => {
            // Python writes floats with a fractional part (1.0, not 1).
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                    return;
                }
            }
            out.push_str(&n.to_string());
        }
        other => out.push_str(&other.to_string()),
    }
}

// ------------------------------------------------------------ strftime_now

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A subset of C `strftime` for UTC timestamps: %Y %y %m %d %-d %e %B %b %A
/// %a %H %I %M %S %p %j %%.
fn strftime_utc(fmt: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |v: i64| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:02}")
            }
        };
        match spec {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&num(m as i64)),
            Some('d') => out.push_str(&num(d as i64)),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&num(hh)),
            Some('I') => out.push_str(&num(if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('M') => out.push_str(&num(mm)),
            Some('S') => out.push_str(&num(ss)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>".into())).unwrap();
        let msgs = vec![json!({"role": "user", "content": "Hi"})];
        let opts = ChatRenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        assert_eq!(
            t.render(&msgs, &opts).unwrap(),
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content | trim }}]\n  {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let out = t
            .render(
                &[
                    json!({"role": "user", "content": " a "}),
                    json!({"role": "user", "content": "b"}),
                ],
                &Default::default(),
            )
            .unwrap();
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn python_methods_and_bos() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% if m['content'].startswith(' x') %}!{% endif %}{% endfor %}{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        let out = t
            .render(
                &[json!({"role": "user", "content": " xy "})],
                &Default::default(),
            )
            .unwrap();
        assert_eq!(out, "<s>xy!a=1");
    }

    #[test]
    fn raise_exception_carries_message() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let err = t
            .render(
                &[json!({"role": "assistant", "content": "x"})],
                &Default::default(),
            )
            .unwrap_err();
        match err {
            ModelError::TemplateException(m) => {
                assert_eq!(m, "Conversation roles must alternate user/assistant")
            }
            other => panic!("unexpected error {other}"),
        }
        assert_eq!(
            t.render(
                &[json!({"role": "user", "content": "x"})],
                &Default::default()
            )
            .unwrap(),
            "ok"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ 'é<b>' | tojson }}|{{ tools is none }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"z": 1.0, "a": [1, 2]}}}]);
        let opts = ChatRenderOptions {
            tools: Some(tools),
            ..Default::default()
        };
        let out = t.render(&[], &opts).unwrap();
        assert_eq!(
            out,
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"z\": 1.0, \"a\": [1, 2]}}}]|\
{\n  \"type\": \"function\",\n  \"function\": {\n    \"name\": \"f\",\n    \"parameters\": {\n      \"z\": 1.0,\n      \"a\": [\n        1,\n        2\n      ]\n    }\n  }\n}|\"é<b>\"|False"
        );
        let t = ChatTemplate::new("{{ tools is none }}", None, None).unwrap();
        assert_eq!(t.render(&[], &Default::default()).unwrap(), "True");
    }

    #[test]
    fn syntax_errors_are_reported_at_load() {
        let err = ChatTemplate::new("{% for x in %}", None, None).unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    }

    #[test]
    fn source_resolution_order() {
        let dir = std::env::temp_dir().join(format!("candela-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(
            resolve_template_source(None, Some(&dir), Some(&cfg), Some("G"))
                .unwrap()
                .as_deref(),
            Some("D")
        );
        assert_eq!(
            resolve_template_source(None, Some(&dir), None, Some("G"))
                .unwrap()
                .as_deref(),
            Some("G")
        );
        std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
        assert_eq!(
            resolve_template_source(None, Some(&dir), Some(&cfg), Some("G"))
                .unwrap()
                .as_deref(),
            Some("J")
        );
        assert_eq!(
            resolve_template_source(Some("{{ 'x' }}"), Some(&dir), Some(&cfg), None)
                .unwrap()
                .as_deref(),
            Some("{{ 'x' }}")
        );
        let f = dir.join("override.jinja");
        std::fs::write(&f, "F").unwrap();
        assert_eq!(
            resolve_template_source(f.to_str(), Some(&dir), None, None)
                .unwrap()
                .as_deref(),
            Some("F")
        );
        assert!(resolve_template_source(Some("/no/such/file.jinja"), None, None, None).is_err());
        let bad = json!({"chat_template": [{"name": "tool_use", "template": "T"}]});
        assert!(resolve_template_source(None, None, Some(&bad), None).is_err());
        assert_eq!(
            resolve_template_source(None, None, None, None).unwrap(),
            None
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %-d, %H:%M:%S %p %j %%", t),
            "Friday July 26, 13:05:09 PM 208 %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d", 0), "1970-01-01");
    }

    #[test]
    fn generation_blocks_render_their_body() {
        assert_eq!(
            generation_blocks_as_ifs(
                "a{% generation %}{{ x }}{%- endgeneration -%} b {% if y %}{% endif %}"
            ),
            "a{% if true %}{{ x }}{%- endif -%} b {% if y %}{% endif %}"
        );
        let t = ChatTemplate::new(
            "{% for m in messages %}{% generation %}{{ m['content'] + ' ' }}{% endgeneration %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let msgs = [serde_json::json!({"role": "assistant", "content": "hi"})];
        assert_eq!(
            t.render(&msgs, &ChatRenderOptions::default()).unwrap(),
            "hi "
        );
    }
}
