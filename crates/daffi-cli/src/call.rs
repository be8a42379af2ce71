//! `daffi call NAME [ARG ...]`: JSON in, JSON out.

use std::time::Duration;

use clap::Args;
use daffi::Global;
use futures_util::StreamExt;
use serde_json::{Map, Value};

use crate::client::{self, code, ClientOptions, Failure};
use crate::json::Json;

/// The arguments of `daffi call`.
#[derive(Args)]
pub struct CallArgs {
    /// The callback to call.
    pub name: String,
    /// Its arguments, each one JSON value: 1, 2.5, true, null, '"text"', '[1, 2]',
    /// '{"k": 1}'.
    #[arg(value_name = "ARG", allow_negative_numbers = true)]
    pub args: Vec<String>,
    /// Call every node serving NAME; prints an object: node name -> result.
    #[arg(long, conflicts_with = "on")]
    pub broadcast: bool,
    /// Call the node NODE instead of a random node serving NAME.
    #[arg(long, value_name = "NODE")]
    pub on: Option<String>,
    /// Give up after this long (exit code 5): 500ms, 5s, 1m30s, ... (more than zero).
    #[arg(long, value_name = "DURATION", value_parser = client::parse_timeout)]
    pub timeout: Option<Duration>,
    /// Do not wait for the result; print nothing. Returns once the controller has the
    /// request.
    #[arg(long)]
    pub no_return: bool,
    /// NAME streams its results: print each item as it comes, one JSON line each.
    /// `--timeout` then bounds the wait for each item.
    #[arg(long, conflicts_with_all = ["broadcast", "no_return"])]
    pub stream: bool,
    /// Send the arguments by name: one ARG, a JSON object of parameter name -> value
    /// (callbacks made with `#[callback]` accept this).
    #[arg(long)]
    pub named: bool,
    #[command(flatten)]
    pub client: ClientOptions,
}

/// Runs `daffi call`.
pub async fn run(args: CallArgs) -> Result<(), Failure> {
    let values = parse_args(&args.args)?;
    let g = args.client.connect().await?;
    let result = call(&g, &args, values).await;
    g.stop();
    result
}

/// Each ARG parsed as JSON, as a list (positional) or, with `--named`, one object.
fn parse_args(raw: &[String]) -> Result<Vec<Value>, Failure> {
    raw.iter()
        .enumerate()
        .map(|(i, text)| {
            serde_json::from_str(text).map_err(|e| {
                let hint = if text.starts_with(['"', '[', '{']) {
                    String::new()
                } else {
                    format!("; a string needs JSON quotes, e.g. '\"{text}\"'")
                };
                Failure::new(
                    code::BAD_ARGUMENTS,
                    format!("argument {} (`{text}`) is not JSON: {e}{hint}", i + 1),
                )
            })
        })
        .collect()
}

async fn call(g: &Global, args: &CallArgs, values: Vec<Value>) -> Result<(), Failure> {
    let mut call = if args.named {
        match <[Value; 1]>::try_from(values) {
            Ok([Value::Object(map)]) => g.call(&args.name).args(map),
            _ => {
                return Err(Failure::new(
                    code::BAD_ARGUMENTS,
                    "--named takes exactly one ARG, a JSON object: '{\"name\": value, ...}'",
                ))
            }
        }
    } else {
        g.call(&args.name).args(values)
    };
    if let Some(timeout) = args.timeout {
        call = call.timeout(timeout);
    }
    if let Some(on) = &args.on {
        call = call.on(on.clone());
    }
    if args.stream {
        return print_stream(call).await;
    }
    match (args.broadcast, args.no_return) {
        (false, false) => {
            let Json(value) = call.fg_async::<Json>().await?;
            print_json(&value);
        }
        (false, true) => {
            call.no_return_async().await?;
            controller_has_it(g).await?;
        }
        (true, true) => {
            call.broadcast_no_return_async().await?;
            controller_has_it(g).await?;
        }
        (true, false) => {
            let mut outcomes: Vec<_> = call
                .broadcast_results_async::<Json>()
                .await?
                .into_iter()
                .collect();
            outcomes.sort_by(|a, b| a.0.cmp(&b.0));
            let mut values = Map::new();
            let mut first_failure = None;
            for (node, outcome) in outcomes {
                match outcome {
                    Ok(Json(value)) => {
                        values.insert(node, value);
                    }
                    Err(e) => {
                        eprintln!("daffi: node `{node}`: {}", client::message_of(&e));
                        first_failure.get_or_insert(client::code_of(&e));
                    }
                }
            }
            print_json(&Value::Object(values));
            if let Some(code) = first_failure {
                return Err(Failure::new(code, "some nodes of the broadcast failed"));
            }
        }
    }
    Ok(())
}

/// Prints each item of a stream call as one JSON line, as it comes.
async fn print_stream(call: daffi::Call) -> Result<(), Failure> {
    let mut items = call.stream::<Json>()?;
    while let Some(item) = items.next().await {
        let Json(value) = item?;
        print_json(&value);
    }
    Ok(())
}

/// Waits until the controller has taken the requests sent so far. The controller handles
/// a node's frames in order, so the answer to any control request (here: its stats)
/// comes after it forwarded them; stopping before that could lose a queued request.
async fn controller_has_it(g: &Global) -> Result<(), Failure> {
    g.controller_stats_async().await?;
    Ok(())
}

fn print_json(value: &Value) {
    // A closed stdout is the reader's choice; nothing to report.
    let _ = client::print_line(&value.to_string());
}
