//! The command line: `serve`, `migrate`, and the operator commands for users, keys and accounts.
//! Listings go to stdout; `keys create` prints the new key alone on stdout's last line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::auth::Permissions;
use crate::config::Config;
use crate::keys;
use crate::store::{GroupBy, NewAccount, Store};
use crate::upstream::{AccountType, Endpoint};
use chrono::{DateTime, Utc};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "An API-key gateway with usage metering"
)]
pub struct Cli {
    /// Config file (default ./config.toml, or $TOLLGATE_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage upstream accounts.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Usage totals over a time range: requests, errors, tokens, cost.
    Usage(UsageArgs),
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Start of the range: RFC 3339 time, a date (YYYY-MM-DD), or an age like 7d / 24h (default 30d).
    #[arg(long, default_value = "30d")]
    pub since: String,
    /// End of the range (exclusive), same forms as --since; default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Group totals by key, account, model or day.
    #[arg(long, value_enum, default_value = "key")]
    pub by: GroupBy,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also check the metering invariants (every request id once, counters equal to row counts).
    #[arg(long)]
    pub check: bool,
}

/// Parses `--since`/`--until`: RFC 3339, a UTC date, or an age before now.
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let age = parse_duration(s)
        .map_err(|_| format!("bad time {s:?}: want RFC 3339, YYYY-MM-DD, or an age like 7d"))?;
    chrono::Duration::from_std(age)
        .map(|a| now - a)
        .map_err(|_| format!("bad time {s:?}: too far back"))
}

#[derive(Subcommand, Debug)]
pub enum UsersCmd {
    /// Add a user.
    Add {
        #[arg(long)]
        email: String,
        #[arg(long)]
        username: String,
        #[arg(long, default_value = "user")]
        role: String,
    },
    /// List users.
    List(ListArgs),
    /// Deactivate a user: every key of theirs is refused.
    Deactivate { id: i64 },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create a key; prints it once, alone on the last line of stdout. Only its SHA-256 is stored.
    Create {
        /// Email of the owning user.
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: String,
        /// Lifetime such as 30d, 12h, 90m or 3600s.
        #[arg(long)]
        expires_in: Option<String>,
        /// JSON array: "/path/prefix" and "model:NAME" (NAME* for a prefix) entries; [] = everything.
        #[arg(long, default_value = "[]")]
        permissions: String,
    },
    /// List keys (prefix and metadata, never the hash).
    List(ListArgs),
    /// Revoke a key.
    Revoke { id: i64 },
}

#[derive(Subcommand, Debug)]
pub enum AccountsCmd {
    /// Add an upstream account.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        base_url: String,
        /// The upstream credential, or ${ENV_VAR}.
        #[arg(long)]
        api_key: String,
        /// Lower value = preferred tier.
        #[arg(long, default_value_t = 1)]
        priority: i32,
        #[arg(long, default_value_t = 1)]
        weight: i32,
        /// Generic accounts: the header carrying the key (default: Authorization: Bearer).
        #[arg(long)]
        header: Option<String>,
        #[arg(long)]
        email: Option<String>,
    },
    /// List upstream accounts.
    List(ListArgs),
    /// Stop sending traffic to an account.
    Disable { id: i64 },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `30d`, `12h`, `90m`, `3600s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: want e.g. 30d, 12h, 90m, 3600s"))?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" | "" => Some(n),
        _ => None,
    }
    .ok_or_else(|| format!("bad duration {s:?}: want e.g. 30d, 12h, 90m, 3600s"))?;
    if secs == 0 {
        return Err(format!("bad duration {s:?}: must be positive"));
    }
    Ok(Duration::from_secs(secs))
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => Config::default_path(),
    };
    let cfg = Config::load(&path, explicit)?;
    if let Command::Serve = cli.command {
        return crate::server::serve(cfg);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = Store::connect(&cfg.database.url, 2)
            .await
            .with_context(|| {
                format!(
                    "opening the database {}",
                    crate::store::redact_url(&cfg.database.url)
                )
            })?;
        let result = admin(&store, cli.command).await;
        store.close().await;
        result
    })
}

async fn admin(store: &Store, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => unreachable!("handled by run"),
        Command::Migrate => eprintln!("migrations applied"),
        Command::Users(UsersCmd::Add {
            email,
            username,
            role,
        }) => {
            if !email.contains('@') {
                bail!("--email {email:?} is not an email address");
            }
            let id = store.create_user(&email, &username, &role).await?;
            eprintln!("created user {id} ({email})");
            println!("{id}");
        }
        Command::Users(UsersCmd::List(args)) => {
            let users = store.list_users().await?;
            print_list(&args, &users, |u| {
                format!(
                    "{:>6}  {:<30} {:<20} {:<8} {}",
                    u.id,
                    u.email,
                    u.username,
                    u.role,
                    active(u.is_active)
                )
            })?;
        }
        Command::Users(UsersCmd::Deactivate { id }) => {
            store.set_user_active(id, false).await?;
            eprintln!("user {id} deactivated");
        }
        Command::Keys(KeysCmd::Create {
            user,
            name,
            expires_in,
            permissions,
        }) => {
            let perms: serde_json::Value = serde_json::from_str(&permissions)
                .map_err(|e| anyhow::anyhow!("--permissions is not JSON: {e}"))?;
            Permissions::parse(&perms).map_err(|e| anyhow::anyhow!("--permissions: {e}"))?;
            let expires_at = match expires_in {
                Some(d) => {
                    let d = parse_duration(&d).map_err(|e| anyhow::anyhow!("--expires-in: {e}"))?;
                    Some(
                        chrono::Utc::now()
                            + chrono::Duration::from_std(d).context("--expires-in is too long")?,
                    )
                }
                None => None,
            };
            let user_id = store.user_id_by_email(&user).await?;
            let key = keys::generate().context("reading the OS random source")?;
            let id = store
                .create_key(
                    user_id,
                    &name,
                    &keys::hash_hex(&key),
                    keys::display_prefix(&key),
                    &perms,
                    expires_at,
                )
                .await?;
            eprintln!("created key {id} for {user}; it is shown only now:");
            println!("{key}");
        }
        Command::Keys(KeysCmd::List(args)) => {
            let keys = store.list_keys().await?;
            print_list(&args, &keys, |k| {
                format!(
                    "{:>6}  {:<10} {:<24} {:<30} {:<8} requests={} expires={}",
                    k.id,
                    k.key_prefix,
                    k.name,
                    k.user_email,
                    active(k.is_active),
                    k.request_count,
                    k.expires_at.map_or("never".to_string(), |e| e.to_rfc3339())
                )
            })?;
        }
        Command::Keys(KeysCmd::Revoke { id }) => {
            store.revoke_key(id).await?;
            eprintln!("key {id} revoked");
        }
        Command::Accounts(AccountsCmd::Add {
            name,
            kind,
            base_url,
            api_key,
            priority,
            weight,
            header,
            email,
        }) => {
            let kind: AccountType = kind
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--type: {e}"))?;
            Endpoint::parse(&base_url).map_err(|e| anyhow::anyhow!("--base-url: {e}"))?;
            if weight < 1 {
                bail!("--weight must be at least 1");
            }
            if api_key.is_empty() {
                bail!("--api-key must not be empty");
            }
            let mut credentials = serde_json::json!({ "api_key": api_key });
            if let Some(h) = header {
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| anyhow::anyhow!("--header {h:?} is not a header name"))?;
                credentials["header"] = serde_json::Value::String(h);
            }
            let id = store
                .create_account(&NewAccount {
                    name: &name,
                    kind,
                    email: email.as_deref(),
                    base_url: &base_url,
                    credentials,
                    priority,
                    weight,
                    is_active: true,
                })
                .await?;
            eprintln!("created account {id} ({name})");
            println!("{id}");
        }
        Command::Accounts(AccountsCmd::List(args)) => {
            let accounts = store.list_accounts().await?;
            print_list(&args, &accounts, |a| {
                format!(
                    "{:>6}  {:<20} {:<9} {:<8} priority={} weight={} {} requests={} ok={} errors={}",
                    a.id,
                    a.name,
                    a.kind.as_str(),
                    active(a.is_active),
                    a.priority,
                    a.weight,
                    a.base_url,
                    a.request_count,
                    a.success_count,
                    a.error_count
                )
            })?;
        }
        Command::Usage(args) => {
            let now = Utc::now();
            let since =
                parse_time(&args.since, now).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let until = match &args.until {
                Some(u) => parse_time(u, now).map_err(|e| anyhow::anyhow!("--until: {e}"))?,
                None => now + chrono::Duration::seconds(1),
            };
            if until <= since {
                bail!("--until must be after --since");
            }
            let totals = store.usage_totals(since, until, args.by).await?;
            let check = if args.check {
                Some(store.usage_invariants().await?)
            } else {
                None
            };
            if args.json {
                let out = serde_json::json!({
                    "since": since, "until": until, "by": args.by, "groups": totals, "invariants": check,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{:<40} {:>10} {:>8} {:>14} {:>14} {:>14} {:>18}",
                    format!("{:?}", args.by).to_lowercase(),
                    "requests",
                    "errors",
                    "prompt_tok",
                    "completion_tok",
                    "tokens",
                    "cost_usd"
                );
                for t in &totals {
                    println!(
                        "{:<40} {:>10} {:>8} {:>14} {:>14} {:>14} {:>18}",
                        t.group,
                        t.requests,
                        t.errors,
                        t.prompt_tokens,
                        t.completion_tokens,
                        t.tokens,
                        t.cost
                    );
                }
                if let Some(c) = check {
                    eprintln!(
                        "invariants {}: rows={} duplicate_request_ids={} keys_mismatched={} accounts_mismatched={}",
                        if c.holds() { "hold" } else { "VIOLATED" },
                        c.rows, c.duplicate_request_ids, c.keys_mismatched, c.accounts_mismatched
                    );
                }
            }
            if check.is_some_and(|c| !c.holds()) {
                bail!("metering invariants violated");
            }
        }
        Command::Accounts(AccountsCmd::Disable { id }) => {
            store.set_account_active(id, false).await?;
            eprintln!("account {id} disabled");
        }
    }
    Ok(())
}

fn active(a: bool) -> &'static str {
    if a {
        "active"
    } else {
        "inactive"
    }
}

fn print_list<T: serde::Serialize>(
    args: &ListArgs,
    items: &[T],
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else {
        for item in items {
            println!("{}", line(item));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (input, expected) in [
            ("30d", Ok(30 * 86_400)),
            ("12h", Ok(43_200)),
            ("90m", Ok(5_400)),
            ("3600s", Ok(3_600)),
            ("45", Ok(45)),
            (
                "0d",
                Err("bad duration \"0d\": must be positive".to_string()),
            ),
            (
                "3w",
                Err("bad duration \"3w\": want e.g. 30d, 12h, 90m, 3600s".to_string()),
            ),
            (
                "d",
                Err("bad duration \"d\": want e.g. 30d, 12h, 90m, 3600s".to_string()),
            ),
        ] {
            assert_eq!(
                parse_duration(input).map(|d| d.as_secs()),
                expected,
                "{input}"
            );
        }
    }
}
