//! `daffi ls`: the connected nodes and the callbacks each serves.

use clap::Args;
use daffi::MemberInfo;
use serde_json::{json, Value};

use crate::client::{self, ClientOptions, Failure};

/// The arguments of `daffi ls`.
#[derive(Args)]
pub struct LsArgs {
    /// Print a JSON array of {"name": .., "callbacks": [..]} instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list the nodes of other running `daffi` commands (named daffi-cli-*).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientOptions,
}

/// Runs `daffi ls`. The nodes are this command's own view, which the controller sends
/// whole when it connects: every node but the command itself.
pub async fn run(args: LsArgs) -> Result<(), Failure> {
    let g = args.client.connect().await?;
    let members: Vec<MemberInfo> = g
        .members()
        .into_iter()
        .filter(|m| args.all || !client::is_cli_node(&m.name))
        .collect();
    let address = args.client.mesh_address(&g);
    g.stop();
    let text = if args.json {
        Value::Array(members.iter().map(member_json).collect()).to_string()
    } else {
        table(&members, &address)
    };
    let _ = client::print_line(&text);
    Ok(())
}

/// A member as JSON: `{"name": .., "callbacks": [..]}`.
pub fn member_json(m: &MemberInfo) -> Value {
    json!({ "name": m.name, "callbacks": m.callbacks })
}

fn table(members: &[MemberInfo], address: &str) -> String {
    let rows: Vec<(&str, &[String])> = members
        .iter()
        .map(|m| (m.name.as_str(), m.callbacks.as_slice()))
        .collect();
    render(&rows, address)
}

fn render(rows: &[(&str, &[String])], address: &str) -> String {
    if rows.is_empty() {
        return format!("no nodes are connected to {address}");
    }
    let width = rows
        .iter()
        .map(|(name, _)| name.chars().count())
        .chain(["NODE".len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:width$}  CALLBACKS", "NODE");
    for (name, callbacks) in rows {
        let callbacks = if callbacks.is_empty() {
            "-".to_string()
        } else {
            callbacks.join(", ")
        };
        out.push_str(&format!("\n{name:width$}  {callbacks}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_an_aligned_table() {
        let calc = ["add".to_string(), "greet".to_string()];
        let rows: [(&str, &[String]); 2] = [("calculator", &calc), ("n", &[])];
        assert_eq!(
            render(&rows, "tcp://x:1"),
            "NODE        CALLBACKS\ncalculator  add, greet\nn           -"
        );
        assert_eq!(
            render(&[], "tcp://x:1"),
            "no nodes are connected to tcp://x:1"
        );
    }
}
