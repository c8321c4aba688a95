//! Function calling: `tools` / `tool_choice` checked, forced calls by grammar, and
//! the DeepSeek tool-call format parsed out of model output.
//!
//! * `tool_choice: "required"` or a named function: the answer is constrained (as
//!   vLLM does) to a JSON list of `{"name", "arguments"}` whose arguments follow the
//!   function's `parameters` schema, so any model returns well-formed calls.
//! * `"auto"`: the tools go to the chat template and the model decides; calls in
//!   DeepSeek's format are parsed from its output (special tokens kept):
//!   `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
//!   (V2.5/V3), or `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` (V3.1).

use crate::error::ApiError;
use serde_json::{json, Value};

/// Marks the start of DeepSeek tool calls.
pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const CALLS_END: &str = "<｜tool▁calls▁end｜>";
const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const CALL_END: &str = "<｜tool▁call▁end｜>";
const SEP: &str = "<｜tool▁sep｜>";

/// How an answer may call tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// No tools.
    None,
    /// The model decides; its calls are parsed.
    Auto,
    /// At least one call, constrained by this schema (a list of calls).
    Forced(Value),
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON string.
    pub arguments: String,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Most calls in one forced answer (`parallel_tool_calls: false` makes it one).
pub const MAX_PARALLEL_CALLS: usize = 8;

/// Checks `tools` and `tool_choice`; returns the mode and the tools for the template.
pub fn mode(
    tools: &Option<Vec<Value>>,
    choice: &Option<Value>,
    parallel: bool,
) -> Result<(ToolMode, Option<Value>), ApiError> {
    let tools = tools.clone().unwrap_or_default();
    if tools.len() > 128 {
        return Err(ApiError::param("tools", "at most 128 tools"));
    }
    let mut funcs: Vec<(String, Value)> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
        if kind != "function" {
            return Err(ApiError::param(
                &format!("tools[{i}].type"),
                "only function tools are supported",
            ));
        }
        let f = t
            .get("function")
            .ok_or_else(|| ApiError::param(&format!("tools[{i}].function"), "missing function"))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        if !valid_name(name) {
            return Err(ApiError::param(
                &format!("tools[{i}].function.name"),
                "function names are 1-64 characters of a-z, A-Z, 0-9, _ and -",
            ));
        }
        let params = match f.get("parameters") {
            None | Some(Value::Null) => {
                json!({"type": "object", "properties": {}, "additionalProperties": false})
            }
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(ApiError::param(
                    &format!("tools[{i}].function.parameters"),
                    "parameters must be a JSON Schema object",
                ))
            }
        };
        funcs.push((name.to_string(), params));
    }
    let call_schema = |name: &str, params: &Value| {
        json!({"type": "object", "additionalProperties": false, "required": ["name", "arguments"],
            "properties": {"name": {"const": name}, "arguments": params}})
    };
    let choice = match choice {
        None | Some(Value::Null) => {
            if funcs.is_empty() {
                "none".to_string()
            } else {
                "auto".to_string()
            }
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::param("tool_choice", "tool_choice must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}"))?;
            let Some((n, p)) = funcs.iter().find(|(n, _)| n == name) else {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            };
            let schema =
                json!({"type": "array", "minItems": 1, "maxItems": 1, "items": call_schema(n, p)});
            return Ok((ToolMode::Forced(schema), Some(Value::Array(tools))));
        }
        Some(_) => {
            return Err(ApiError::param(
                "tool_choice",
                "tool_choice must be none, auto, required or a function",
            ))
        }
    };
    match choice.as_str() {
        "none" => Ok((ToolMode::None, None)),
        "auto" | "required" if funcs.is_empty() => Err(ApiError::param(
            "tool_choice",
            format!("tool_choice {choice} needs tools"),
        )),
        "auto" => Ok((ToolMode::Auto, Some(Value::Array(tools)))),
        "required" => {
            let any: Vec<Value> = funcs.iter().map(|(n, p)| call_schema(n, p)).collect();
            let max = if parallel { MAX_PARALLEL_CALLS } else { 1 };
            let schema =
                json!({"type": "array", "minItems": 1, "maxItems": max, "items": {"anyOf": any}});
            Ok((ToolMode::Forced(schema), Some(Value::Array(tools))))
        }
        other => Err(ApiError::param(
            "tool_choice",
            format!("tool_choice must be none, auto, required or a function, got {other}"),
        )),
    }
}

/// Calls from a forced answer (`[{"name", "arguments"}, ...]`); None if it is not that.
pub fn parse_forced(text: &str) -> Option<Vec<Call>> {
    let v: Value = serde_json::from_str(text).ok()?;
    v.as_array()?
        .iter()
        .map(|c| {
            Some(Call {
                name: c.get("name")?.as_str()?.to_string(),
                arguments: c.get("arguments")?.to_string(),
            })
        })
        .collect()
}

/// Splits model output into content and DeepSeek-format tool calls.
pub fn parse_native(text: &str) -> (String, Vec<Call>) {
    let Some(start) = text.find(CALLS_BEGIN).or_else(|| text.find(CALL_BEGIN)) else {
        return (text.to_string(), Vec::new());
    };
    let content = text[..start].to_string();
    let mut rest = &text[start..];
    rest = rest.strip_prefix(CALLS_BEGIN).unwrap_or(rest);
    let mut calls = Vec::new();
    while let Some(b) = rest.find(CALL_BEGIN) {
        let after = &rest[b + CALL_BEGIN.len()..];
        let end = after.find(CALL_END).unwrap_or(after.len());
        let body = &after[..end];
        if let Some((head, tail)) = body.split_once(SEP) {
            let call = if head.trim() == "function" {
                // NAME\n```json\nARGS\n```
                let (name, args) = tail.split_once('\n').unwrap_or((tail, ""));
                let args = args.trim();
                let args = args
                    .strip_prefix("```json")
                    .or_else(|| args.strip_prefix("```"))
                    .unwrap_or(args);
                let args = args.strip_suffix("```").unwrap_or(args).trim();
                Call {
                    name: name.trim().to_string(),
                    arguments: args.to_string(),
                }
            } else {
                Call {
                    name: head.trim().to_string(),
                    arguments: tail.trim().to_string(),
                }
            };
            calls.push(call);
        }
        rest = &after[(end + CALL_END.len()).min(after.len())..];
    }
    let _ = CALLS_END;
    (content, calls)
}

/// OpenAI's `tool_calls` entries.
pub fn to_json(calls: &[Call], id_seed: &str) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "id": format!("call_{id_seed}_{i}"), "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_v25_and_v31_formats_parse() {
        let v25 = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Hangzhou\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse_native(v25);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![
                Call {
                    name: "get_weather".into(),
                    arguments: "{\"city\": \"Hangzhou\"}".into()
                },
                Call {
                    name: "get_time".into(),
                    arguments: "{}".into()
                },
            ]
        );
        let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{\"a\": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse_native(v31);
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![Call {
                name: "add".into(),
                arguments: "{\"a\": 1}".into()
            }]
        );
        assert_eq!(parse_native("plain").1, vec![]);
    }

    #[test]
    fn modes_and_their_errors() {
        let tools = Some(vec![json!({"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}})]);
        assert_eq!(mode(&None, &None, true).unwrap().0, ToolMode::None);
        assert_eq!(
            mode(&None, &Some(json!("none")), true).unwrap().0,
            ToolMode::None
        );
        assert_eq!(mode(&tools, &None, true).unwrap().0, ToolMode::Auto);
        assert!(matches!(
            mode(&tools, &Some(json!("required")), true).unwrap().0,
            ToolMode::Forced(_)
        ));
        assert!(matches!(
            mode(
                &tools,
                &Some(json!({"type": "function", "function": {"name": "add"}})),
                true
            )
            .unwrap()
            .0,
            ToolMode::Forced(_)
        ));
        let e = mode(
            &tools,
            &Some(json!({"type": "function", "function": {"name": "sub"}})),
            true,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = mode(&None, &Some(json!("required")), true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let bad = Some(vec![
            json!({"type": "function", "function": {"name": "a b"}}),
        ]);
        assert_eq!(
            mode(&bad, &None, true).unwrap_err().param.as_deref(),
            Some("tools[0].function.name")
        );
        assert_eq!(
            parse_forced("[{\"name\": \"add\", \"arguments\": {\"a\": 1}}]").unwrap(),
            vec![Call {
                name: "add".into(),
                arguments: "{\"a\":1}".into()
            }]
        );
    }
}
