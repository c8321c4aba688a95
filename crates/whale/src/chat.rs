//! `whale chat`: an interactive terminal chat through the chat template.
//!
//! Each turn re-renders the whole conversation and reuses the latent cache for
//! the longest token prefix it already holds, so only new tokens are prefilled.

use crate::SamplingArgs;
use anyhow::{Context, Result};
use std::io::{BufRead, Write};
use whale_engine::{chat_prompt, generate_with_cache};
use whale_model::{Message, ModelFolder};

pub fn run(folder: &ModelFolder, system: Option<String>, args: &SamplingArgs) -> Result<()> {
    let tok = folder
        .tokenizer
        .as_ref()
        .context("the model folder has no tokenizer.json")?;
    // Fail before the first prompt, not after it.
    tok.chat_template()
        .context("the tokenizer config has no chat_template")?;
    let fresh = || -> Vec<Message> { system.iter().map(|s| Message::new("system", s)).collect() };
    let mut messages = fresh();
    let mut cache = folder.model.new_cache();
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("whale chat — /reset clears the conversation, /exit quits.");
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = fresh();
                cache.clear();
                cached.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            "" => continue,
            _ => {}
        }
        messages.push(Message::new("user", line));
        let ids = chat_prompt(tok, &messages)?;
        // Reuse the cached prefix; at least one token must be fed.
        let keep = cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        cache.truncate(keep);
        cached.truncate(keep);
        let req = args.request(folder, ids[keep..].to_vec())?;
        // The template ends in "Assistant:" and the model answers " ...": the leading
        // space belongs to the template's "Assistant: " when the turn is re-rendered.
        let mut started = false;
        let g = generate_with_cache(&folder.model, Some(tok), &req, &mut cache, &mut |piece| {
            let piece = if started { piece } else { piece.trim_start() };
            started |= !piece.is_empty();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        cached.extend_from_slice(&ids[keep..]);
        // The last sampled token was not fed to the model.
        cached.extend_from_slice(&g.tokens[..g.tokens.len().saturating_sub(1)]);
        messages.push(Message::new(
            "assistant",
            g.text.as_deref().unwrap_or("").trim_start(),
        ));
    }
    Ok(())
}
