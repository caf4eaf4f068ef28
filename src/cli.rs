//! The command line: `serve`, `migrate`, and the operator commands for users, keys, accounts,
//! credits, budgets and plans.
//! Listings go to stdout; `keys create` prints the new key alone on stdout's last line. Every
//! change is audited as done by `cli:<OS user>`; `tollgate audit` reads the log.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::config;
use crate::keyring;
use crate::ops;
use crate::settings::{self, Settings};
use crate::store::{
    AccountLimitColumns, Actor, AuditRow, GrantOutcome, GroupBy, LimitColumns, LimitPatch, Store,
};

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
    /// Prepaid credits: grants, balances, the ledger.
    #[command(subcommand)]
    Credits(CreditsCmd),
    /// Budgets on keys, users and plans: cost, tokens or requests per day, week, month or in total.
    #[command(subcommand)]
    Budgets(BudgetsCmd),
    /// Plans: rate limits and budgets that apply to each subscribed user (`users subscribe`).
    #[command(subcommand)]
    Plans(PlansCmd),
    /// Usage totals over a time range: requests, errors, tokens, cost.
    Usage(UsageArgs),
    /// The audit log: every admin action (CLI or admin API), newest first.
    Audit(AuditArgs),
    /// Tell a running gateway to re-read its config (through its admin API).
    Reload {
        /// The admin API's address, when `[admin] listen` does not say it (port 0: the gateway's
        /// `tollgate ready … admin=ADDR` log line names the port it got).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Start of the range: RFC 3339 time, a date (YYYY-MM-DD), or an age like 7d / 24h (default 30d).
    #[arg(long, default_value = "30d")]
    pub since: String,
    /// End of the range (exclusive), same forms as --since; default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Group totals by key, account, model (as requested), served-model, day or user (with
    /// each user's budgets and credit).
    #[arg(long, value_enum, default_value = "key")]
    pub by: By,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also check the metering invariants (every request id once, counters equal to row counts).
    #[arg(long)]
    pub check: bool,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// How many rows, newest first (1 to 10000).
    #[arg(long, default_value_t = ops::AUDIT_LIMIT.0)]
    pub limit: i64,
    /// Only rows about this target: TYPE (user, key, account, budget, plan, config, keyring) or
    /// TYPE:ID.
    #[arg(long, value_name = "TYPE[:ID]")]
    pub target: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--by`: the command-line spelling of [`GroupBy`] (storage knows nothing of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Key,
    Account,
    /// The model the client asked for.
    Model,
    /// The model the upstream says served the request.
    ServedModel,
    Day,
    /// The user (all of their keys), with their budgets and credit below the table.
    User,
}

impl From<By> for GroupBy {
    fn from(by: By) -> GroupBy {
        match by {
            By::Key => GroupBy::Key,
            By::Account => GroupBy::Account,
            By::Model => GroupBy::Model,
            By::ServedModel => GroupBy::ServedModel,
            By::Day => GroupBy::Day,
            By::User => GroupBy::User,
        }
    }
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
    /// Activate a deactivated user again: their keys work again (unless revoked or expired).
    Activate { id: i64 },
    /// Change a user's rate limits, over all of their keys together; running gateways apply
    /// them within a second.
    Update {
        /// The user's email.
        email: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Subscribe a user to a plan (replacing any subscription they have): its rate limits apply
    /// where the user has none of their own, its budgets to the user on their own, in periods
    /// from --period-start.
    Subscribe {
        /// The user's email.
        email: String,
        /// The plan's name.
        #[arg(long)]
        plan: String,
        /// Where the plan's budget periods start from: RFC 3339 or YYYY-MM-DD (default now).
        #[arg(long)]
        period_start: Option<String>,
        /// The current period's end as your billing system has it (recorded, shown).
        #[arg(long)]
        period_end: Option<String>,
    },
    /// End a user's subscription: the plan's limits and budgets stop applying to them.
    Unsubscribe {
        /// The user's email.
        email: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlansCmd {
    /// Add a plan: rate limits and budgets per subscriber; prints its id.
    Add {
        name: String,
        /// Per subscriber, over all of their keys (0 or none = no limit).
        #[command(flatten)]
        limits: LimitArgs,
        /// A budget of each subscriber, e.g. tokens:2000000:month or cost:50:month (periods
        /// from the subscriber's period start); repeatable.
        #[arg(long = "budget", value_name = "METRIC:LIMIT:PERIOD", value_parser = budget_spec)]
        budgets: Vec<ops::PlanBudgetInput>,
    },
    /// List plans with their limits, budgets and subscriber counts.
    List(ListArgs),
    /// Change a plan's rate limits (`default` removes one); its budgets change with
    /// `budgets set --plan NAME`. Running gateways apply it within a second.
    Update {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// `--budget METRIC:LIMIT:PERIOD` (checked by `ops`).
fn budget_spec(s: &str) -> Result<ops::PlanBudgetInput, String> {
    match s.split(':').collect::<Vec<_>>().as_slice() {
        [metric, limit, period] => Ok(ops::PlanBudgetInput {
            metric: metric.to_string(),
            limit: limit.to_string(),
            period: period.to_string(),
        }),
        _ => Err(format!(
            "{s:?}: want METRIC:LIMIT:PERIOD, e.g. tokens:2000000:month"
        )),
    }
}

/// Rate limits on the command line: a count (0 = no limit), or `default` to remove one (a key
/// then follows `[limits]`, a user has none).
#[derive(Args, Debug, Default)]
pub struct LimitArgs {
    /// Requests per minute.
    #[arg(long, value_name = "N|default", value_parser = limit_arg, allow_hyphen_values = true)]
    pub rpm: Option<LimitArg>,
    /// Requests per day.
    #[arg(long, value_name = "N|default", value_parser = limit_arg, allow_hyphen_values = true)]
    pub rpd: Option<LimitArg>,
    /// Tokens (input + output) per minute.
    #[arg(long, value_name = "N|default", value_parser = limit_arg, allow_hyphen_values = true)]
    pub tpm: Option<LimitArg>,
    /// Requests in flight at once.
    #[arg(long, value_name = "N|default", value_parser = limit_arg, allow_hyphen_values = true)]
    pub max_concurrent: Option<LimitArg>,
}

/// One `--rpm`-like value: `Some(n)`, or `None` for `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitArg(pub Option<i64>);

fn limit_arg(s: &str) -> Result<LimitArg, String> {
    if s == "default" {
        return Ok(LimitArg(None));
    }
    s.parse::<i64>()
        .map(|n| LimitArg(Some(n)))
        .map_err(|_| format!("{s:?} is not a count (0 = no limit) or 'default'"))
}

impl LimitArgs {
    fn patch(&self) -> LimitPatch {
        let f = |a: Option<LimitArg>| a.map(|a| a.0);
        LimitPatch {
            rpm: f(self.rpm),
            rpd: f(self.rpd),
            tpm: f(self.tpm),
            max_concurrent: f(self.max_concurrent),
        }
    }
}

/// An upstream account's declared provider limits: a count, 0 = none declared.
#[derive(Args, Debug, Default)]
pub struct AccountLimitArgs {
    /// Requests per minute the provider allows this account (0 = none declared).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub rpm: Option<i64>,
    /// Tokens (input + output) per minute the provider allows (0 = none declared).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub tpm: Option<i64>,
    /// Requests in flight at once the provider allows (0 = none declared).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub max_concurrent: Option<i64>,
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
        /// The key's own rate limits (without them `[limits]` applies).
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (prefix and metadata, never the hash).
    List(ListArgs),
    /// Revoke a key.
    Revoke { id: i64 },
    /// Change a key's rate limits; running gateways apply them within a second.
    Update {
        id: i64,
        #[command(flatten)]
        limits: LimitArgs,
    },
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
        /// The provider's limits on the account, so it is skipped at them instead of answering 429.
        #[command(flatten)]
        limits: AccountLimitArgs,
    },
    /// Change an account's declared limits, priority or weight; running gateways apply them
    /// within a second.
    Update {
        /// The account's name or id.
        account: String,
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
        #[arg(long, allow_hyphen_values = true)]
        weight: Option<i32>,
        #[command(flatten)]
        limits: AccountLimitArgs,
    },
    /// List upstream accounts.
    List(ListArgs),
    /// Stop sending traffic to an account.
    Disable { id: i64 },
    /// Send traffic to a disabled account again.
    Enable { id: i64 },
    /// Delete an account (softly: its usage rows keep referring to it).
    Delete { id: i64 },
    /// Re-seal every stored upstream credential under the current master key (TOLLGATE_MASTER_KEY,
    /// [database] master_key_file, or the default key file, created if missing), in one
    /// transaction. The key they are sealed with now comes from --old-key-file or
    /// TOLLGATE_OLD_MASTER_KEY.
    RotateEncryption {
        /// A file holding the key the credentials are sealed with now (64 hex digits); repeatable.
        #[arg(long = "old-key-file")]
        old_key_files: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CreditsCmd {
    /// Grant credit (USD) to a user; from the first grant on, the user's requests are admitted
    /// only against their balance.
    Grant {
        /// The user's email.
        #[arg(long)]
        user: String,
        /// USD, exact: e.g. 10 or 0.25.
        #[arg(long)]
        amount: String,
        /// Lifetime of this grant such as 30d (default: never expires).
        #[arg(long)]
        expires_in: Option<String>,
        /// The same key with the same request grants once; with another request it is refused.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Record it as a refund instead of a grant.
        #[arg(long)]
        refund: bool,
        /// Kept in the ledger row's metadata.
        #[arg(long)]
        note: Option<String>,
    },
    /// A user's balance: details on stderr, the balance alone on stdout's last line.
    Balance {
        #[arg(long)]
        user: String,
    },
    /// A user's ledger, newest first.
    History {
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BudgetsCmd {
    /// Set (or replace) a budget of a key, a user or a plan; running gateways apply it within a
    /// second.
    #[command(group(clap::ArgGroup::new("owner").required(true).args(["key", "user", "plan"])))]
    Set {
        /// The key's id.
        #[arg(long)]
        key: Option<i64>,
        /// The user's email (the budget covers all of their keys together).
        #[arg(long)]
        user: Option<String>,
        /// The plan's name (the budget applies to each subscriber on their own, in periods from
        /// their period start).
        #[arg(long)]
        plan: Option<String>,
        /// What is counted: cost (USD), tokens or requests.
        #[arg(long)]
        metric: String,
        /// The most allowed in a period (0 refuses everything).
        #[arg(long)]
        limit: String,
        /// day, week, month (calendar, UTC; a plan's from each subscriber's start) or total.
        #[arg(long)]
        period: String,
    },
    /// List budgets with what each subject spent in its current period.
    List(ListArgs),
    /// Delete a budget.
    Delete { id: i64 },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => config::default_path(),
    };
    let cfg = Settings::load(&path, explicit)?;
    match cli.command {
        Command::Serve => return crate::server::serve(cfg, path),
        Command::Reload { admin } => return reload(admin.unwrap_or(cfg.admin.listen)),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tracing::debug!(database = %crate::store::redact_url(&cfg.database.url), "opening the database");
        if let Some(file) = cfg.database.sqlite_file().filter(|f| !f.exists()) {
            // The trap this avoids: a relative path or a mistyped --config silently giving a new,
            // empty database.
            tracing::warn!(file = %file.display(), "no database file there yet: creating an empty one");
        }
        let store = Store::connect_within(&cfg.database.url, 2, cfg.database.connect_timeout)
            .await
            .with_context(|| {
                format!(
                    "opening the database {}",
                    crate::store::redact_url(&cfg.database.url)
                )
            })?;
        let result = admin(&store, &cfg.database, &cli_actor(), cli.command).await;
        store.close().await;
        result
    })
}

/// Account commands that write first open the credentials (`keyring::unlock`: the key checked,
/// plaintext credentials from before encryption sealed in place).
async fn admin(
    store: &Store,
    db: &settings::Database,
    actor: &Actor,
    command: Command,
) -> anyhow::Result<()> {
    match command {
        Command::Serve | Command::Reload { .. } => unreachable!("handled by run"),
        Command::Migrate => eprintln!("migrations applied"),
        Command::Users(UsersCmd::Add {
            email,
            username,
            role,
        }) => {
            let u = ops::add_user(
                store,
                actor,
                &ops::NewUser {
                    email,
                    username,
                    role,
                },
            )
            .await
            .map_err(flag)?;
            eprintln!("created user {} ({})", u.id, u.email);
            println!("{}", u.id);
        }
        Command::Users(UsersCmd::List(args)) => {
            let users = ops::list_users(store).await?;
            print_list(&args, &users, "no users", |u| {
                format!(
                    "{:>6}  {:<30} {:<20} {:<8} {:<8} limits={}",
                    u.id,
                    u.email,
                    u.username,
                    u.role,
                    active(u.is_active),
                    limits(&u.limits, "none")
                )
            })?;
        }
        Command::Users(UsersCmd::Deactivate { id }) => {
            ops::deactivate_user(store, actor, id).await?;
            eprintln!("user {id} deactivated; running gateways refuse their keys within a second");
        }
        Command::Users(UsersCmd::Activate { id }) => {
            ops::activate_user(store, actor, id).await?;
            eprintln!("user {id} activated; running gateways accept their keys within a second");
        }
        Command::Users(UsersCmd::Update { email, limits }) => {
            let patch = limits.patch();
            if patch.is_empty() {
                bail!("nothing to change: give --rpm, --rpd, --tpm or --max-concurrent");
            }
            let id = store.user_id_by_email(&email).await?;
            ops::update_user(store, actor, id, &patch)
                .await
                .map_err(flag)?;
            eprintln!("user {email} updated; running gateways apply it within a second");
        }
        Command::Users(UsersCmd::Subscribe {
            email,
            plan,
            period_start,
            period_end,
        }) => {
            let s = ops::subscribe(
                store,
                actor,
                &ops::SubscribeInput {
                    user: email.clone(),
                    plan,
                    period_start,
                    period_end,
                },
            )
            .await
            .map_err(flag)?;
            eprintln!(
                "user {email} subscribed to plan {} from {}; running gateways apply it within a second",
                s.plan,
                s.current_period_start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
        Command::Users(UsersCmd::Unsubscribe { email }) => {
            let s = ops::unsubscribe(store, actor, &email).await.map_err(flag)?;
            eprintln!(
                "user {email} unsubscribed from plan {}; running gateways apply it within a second",
                s.plan
            );
        }
        Command::Plans(PlansCmd::Add {
            name,
            limits,
            budgets,
        }) => {
            let l = limits.patch();
            let p = ops::create_plan(
                store,
                actor,
                &ops::PlanInput {
                    name,
                    rpm: l.rpm.flatten(),
                    rpd: l.rpd.flatten(),
                    tpm: l.tpm.flatten(),
                    max_concurrent: l.max_concurrent.flatten(),
                    budgets,
                },
            )
            .await
            .map_err(flag)?;
            eprintln!("created plan {} ({})", p.id, p.name);
            println!("{}", p.id);
        }
        Command::Plans(PlansCmd::List(args)) => {
            let plans = ops::list_plans(store).await?;
            print_list(&args, &plans, "no plans", |p| {
                let budgets: Vec<String> = p
                    .budgets
                    .iter()
                    .map(|b| format!("{}:{}:{}", b.metric.as_str(), b.limit, b.period.as_str()))
                    .collect();
                format!(
                    "{:>6}  {:<20} limits={} budgets={} subscribers={}",
                    p.id,
                    p.name,
                    limits(&p.limits, "none"),
                    if budgets.is_empty() {
                        "none".to_string()
                    } else {
                        budgets.join(",")
                    },
                    p.subscribers
                )
            })?;
        }
        Command::Plans(PlansCmd::Update { name, limits }) => {
            let patch = limits.patch();
            if patch.is_empty() {
                bail!("nothing to change: give --rpm, --rpd, --tpm or --max-concurrent");
            }
            ops::update_plan(store, actor, &name, &patch)
                .await
                .map_err(flag)?;
            eprintln!("plan {name} updated; running gateways apply it within a second");
        }
        Command::Keys(KeysCmd::Create {
            user,
            name,
            expires_in,
            permissions,
            limits,
        }) => {
            let permissions: serde_json::Value = serde_json::from_str(&permissions)
                .map_err(|e| anyhow::anyhow!("--permissions is not JSON: {e}"))?;
            let k = ops::create_key(
                store,
                actor,
                &ops::NewKey {
                    user: user.clone(),
                    name,
                    expires_in,
                    permissions,
                    rpm: limits.rpm.and_then(|a| a.0),
                    rpd: limits.rpd.and_then(|a| a.0),
                    tpm: limits.tpm.and_then(|a| a.0),
                    max_concurrent: limits.max_concurrent.and_then(|a| a.0),
                },
            )
            .await
            .map_err(flag)?;
            eprintln!("created key {} for {user}; it is shown only now:", k.id);
            println!("{}", k.key);
        }
        Command::Keys(KeysCmd::List(args)) => {
            let keys = ops::list_keys(store).await?;
            print_list(&args, &keys, "no keys", |k| {
                format!(
                    "{:>6}  {:<10} {:<24} {:<30} {:<8} requests={} expires={} permissions={} limits={}",
                    k.id,
                    k.key_prefix,
                    k.name,
                    k.user_email,
                    active(k.is_active),
                    k.request_count,
                    k.expires_at.map_or("never".to_string(), |e| e.to_rfc3339()),
                    permissions(&k.permissions),
                    limits(&k.limits, "default")
                )
            })?;
        }
        Command::Keys(KeysCmd::Revoke { id }) => {
            ops::revoke_key(store, actor, id).await?;
            eprintln!("key {id} revoked; running gateways refuse it within a second");
        }
        Command::Keys(KeysCmd::Update { id, limits }) => {
            let patch = limits.patch();
            if patch.is_empty() {
                bail!("nothing to change: give --rpm, --rpd, --tpm or --max-concurrent");
            }
            ops::update_key(
                store,
                actor,
                id,
                &crate::store::KeyPatch {
                    limits: patch,
                    ..Default::default()
                },
            )
            .await
            .map_err(flag)?;
            eprintln!("key {id} updated; running gateways apply it within a second");
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
            limits,
        }) => {
            let input = ops::NewAccountInput {
                name: name.clone(),
                kind,
                base_url,
                api_key,
                priority,
                weight,
                header,
                email,
                rpm: limits.rpm,
                tpm: limits.tpm,
                max_concurrent: limits.max_concurrent,
            };
            // Bad input is refused before the keyring is opened (or its file created).
            ops::check_account(&input).map_err(flag)?;
            let sealing = keyring::unlock(store, db, actor).await?;
            let id = ops::add_account(store, &sealing, actor, &input)
                .await
                .map_err(flag)?;
            eprintln!("created account {id} ({name})");
            println!("{id}");
        }
        Command::Accounts(AccountsCmd::Update {
            account,
            priority,
            weight,
            limits,
        }) => {
            let update = ops::AccountUpdate {
                priority,
                weight,
                rpm: limits.rpm.map(Some),
                tpm: limits.tpm.map(Some),
                max_concurrent: limits.max_concurrent.map(Some),
                ..Default::default()
            };
            if priority.is_none()
                && weight.is_none()
                && limits.rpm.is_none()
                && limits.tpm.is_none()
                && limits.max_concurrent.is_none()
            {
                bail!("nothing to change: give --rpm, --tpm, --max-concurrent, --priority or --weight");
            }
            let accounts = ops::list_accounts(store).await?;
            let id = match accounts.iter().find(|a| a.name == account) {
                Some(a) => a.id,
                None => match account.parse::<i64>() {
                    Ok(id) => id,
                    Err(_) => bail!("no account named {account:?}"),
                },
            };
            let sealing = keyring::unlock(store, db, actor).await?;
            ops::update_account(store, &sealing, actor, id, &update)
                .await
                .map_err(flag)?;
            eprintln!("account {account} updated; running gateways apply it within a second");
        }
        Command::Accounts(AccountsCmd::List(args)) => {
            let accounts = ops::list_accounts(store).await?;
            print_list(&args, &accounts, "no accounts", |a| {
                format!(
                    "{:>6}  {:<20} {:<9} {:<8} priority={} weight={} {} requests={} ok={} errors={} limits={}",
                    a.id,
                    a.name,
                    a.kind.as_str(),
                    active(a.is_active),
                    a.priority,
                    a.weight,
                    a.base_url,
                    a.request_count,
                    a.success_count,
                    a.error_count,
                    account_limits(&a.limits)
                )
            })?;
        }
        Command::Accounts(AccountsCmd::Disable { id }) => {
            let sealing = keyring::unlock(store, db, actor).await?;
            ops::update_account(
                store,
                &sealing,
                actor,
                id,
                &ops::AccountUpdate {
                    is_active: Some(false),
                    ..Default::default()
                },
            )
            .await?;
            eprintln!("account {id} disabled");
        }
        Command::Accounts(AccountsCmd::Enable { id }) => {
            let sealing = keyring::unlock(store, db, actor).await?;
            ops::update_account(
                store,
                &sealing,
                actor,
                id,
                &ops::AccountUpdate {
                    is_active: Some(true),
                    ..Default::default()
                },
            )
            .await?;
            eprintln!("account {id} enabled");
        }
        Command::Accounts(AccountsCmd::Delete { id }) => {
            keyring::unlock(store, db, actor).await?;
            ops::delete_account(store, actor, id).await?;
            eprintln!("account {id} deleted");
        }
        Command::Accounts(AccountsCmd::RotateEncryption { old_key_files }) => {
            let (n, key_id) = keyring::rotate(store, db, &old_key_files, actor).await?;
            eprintln!(
                "{n} upstream credentials re-sealed under master key id {key_id}; restart running gateways with this key (until then they keep the accounts they have loaded)"
            );
        }
        Command::Credits(CreditsCmd::Grant {
            user,
            amount,
            expires_in,
            idempotency_key,
            refund,
            note,
        }) => {
            let input = ops::GrantInput {
                amount,
                expires_in,
                refund,
                note,
            };
            let (receipt, replayed) = match ops::grant_credits(
                store,
                actor,
                ops::UserRef::Email(&user),
                &input,
                idempotency_key.as_deref(),
            )
            .await
            .map_err(flag)?
            {
                GrantOutcome::Granted(r) => (r, false),
                GrantOutcome::Replayed(r) => (r, true),
            };
            if replayed {
                eprintln!(
                    "already granted with this idempotency key (transaction {}): nothing granted again",
                    receipt.transaction_id
                );
            } else {
                eprintln!(
                    "granted {} to {user} (transaction {}{})",
                    receipt.amount,
                    receipt.transaction_id,
                    receipt
                        .expires_at
                        .map_or(String::new(), |e| format!(", expires {}", e.to_rfc3339()))
                );
            }
            println!("{}", receipt.balance.normalize());
        }
        Command::Credits(CreditsCmd::Balance { user }) => {
            let b = ops::credit_balance(store, ops::UserRef::Email(&user))
                .await
                .map_err(flag)?;
            if b.prepaid {
                eprintln!(
                    "{user}: balance {} (held in leases by running gateways: {}, overdraft allowed: {})",
                    b.balance.normalize(),
                    b.leased.normalize(),
                    b.overdraft.normalize()
                );
            } else {
                eprintln!("{user} was never granted credits: requests are not limited by credits");
            }
            println!("{}", b.balance.normalize());
        }
        Command::Credits(CreditsCmd::History { user, limit, json }) => {
            let rows = ops::credit_history(store, ops::UserRef::Email(&user), limit)
                .await
                .map_err(flag)?;
            print_list(&ListArgs { json }, &rows, "no ledger entries", |t| {
                format!(
                    "{:>8}  {} {:<7} {:>22} {:>22} -> {:<22} {}",
                    t.id,
                    t.created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    t.action,
                    t.amount,
                    t.balance_before,
                    t.balance_after,
                    t.request_id
                        .as_deref()
                        .or(t.idempotency_key.as_deref())
                        .unwrap_or("-")
                )
            })?;
        }
        Command::Budgets(BudgetsCmd::Set {
            key,
            user,
            plan,
            metric,
            limit,
            period,
        }) => {
            let b = ops::set_budget(
                store,
                actor,
                &ops::BudgetInput {
                    key,
                    user: user.clone(),
                    plan: plan.clone(),
                    metric,
                    limit,
                    period,
                },
            )
            .await
            .map_err(flag)?;
            let owner = match (key, user, plan) {
                (Some(k), _, _) => format!("key {k}"),
                (_, Some(u), _) => u,
                (_, _, p) => format!("each subscriber of plan {}", p.unwrap_or_default()),
            };
            eprintln!(
                "budget {} set: {owner} may use {} {} per {}; running gateways apply it within a second",
                b.id,
                b.limit,
                b.metric.as_str(),
                b.period.as_str()
            );
            println!("{}", b.id);
        }
        Command::Budgets(BudgetsCmd::List(args)) => {
            let budgets = ops::list_budgets(store).await?;
            print_list(&args, &budgets, "no budgets", |b| {
                let periods: Vec<String> = b
                    .periods
                    .iter()
                    .map(|p| {
                        format!(
                            "{}:{} spent {} leased {}",
                            p.subject_id,
                            p.period_start.date_naive(),
                            p.spent,
                            p.leased
                        )
                    })
                    .collect();
                format!(
                    "{:>6}  {:<30} {:<8} {:>20} per {:<6} {}",
                    b.budget.id,
                    b.owner,
                    b.budget.metric.as_str(),
                    b.budget.limit,
                    b.budget.period.as_str(),
                    periods.join(", ")
                )
            })?;
        }
        Command::Budgets(BudgetsCmd::Delete { id }) => {
            ops::delete_budget(store, actor, id).await.map_err(flag)?;
            eprintln!("budget {id} deleted; running gateways apply it within a second");
        }
        Command::Audit(args) => {
            let (target_type, target_id) = match &args.target {
                Some(t) => match t.split_once(':') {
                    Some((kind, id)) => (Some(kind), Some(id)),
                    None => (Some(t.as_str()), None),
                },
                None => (None, None),
            };
            let rows = ops::audit_log(store, Some(args.limit), target_type, target_id)
                .await
                .map_err(|e| match e {
                    ops::OpsError::Invalid { field, message } if field.starts_with("target") => {
                        anyhow::anyhow!("--target: {message}")
                    }
                    other => flag(other),
                })?;
            print_list(
                &ListArgs { json: args.json },
                &rows,
                "no audit rows",
                audit_line,
            )?;
        }
        Command::Usage(args) => {
            let report = ops::usage(store, &args.since, args.until.as_deref(), args.by.into())
                .await
                .map_err(flag)?;
            let check = if args.check {
                Some((
                    store.usage_invariants().await?,
                    store.spend_invariants().await?,
                ))
            } else {
                None
            };
            let spend = match args.by {
                By::User => Some(ops::user_spend(store, &report).await.map_err(flag)?),
                _ => None,
            };
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "report": report,
                        "invariants": check.map(|c| c.0),
                        "spend_invariants": check.map(|c| c.1),
                    }))?
                );
            } else {
                let by = format!("{:?}", args.by).to_lowercase();
                println!(
                    "{by:<40} {:>10} {:>8} {:>14} {:>14} {:>14} {:>20}",
                    "requests", "errors", "prompt_tok", "completion_tok", "tokens", "cost_usd"
                );
                for t in &report.groups {
                    println!(
                        "{:<40} {:>10} {:>8} {:>14} {:>14} {:>14} {:>20}",
                        t.group,
                        t.requests,
                        t.errors,
                        t.prompt_tokens,
                        t.completion_tokens,
                        t.tokens,
                        t.cost
                    );
                }
                for u in spend.iter().flatten() {
                    if let Some(b) = u.credit_balance {
                        println!("  {}: credit balance {b}", u.user);
                    }
                    for b in &u.budgets {
                        let whose = b
                            .budget
                            .api_key_id
                            .map_or(String::new(), |k| format!(" (key {k})"));
                        let spent = b
                            .periods
                            .first()
                            .map_or(rust_decimal::Decimal::ZERO, |p| p.spent);
                        println!(
                            "  {}: {} per {}{whose}: {} of {}",
                            u.user,
                            b.budget.metric.as_str(),
                            b.budget.period.as_str(),
                            spent.normalize(),
                            b.budget.limit.normalize()
                        );
                    }
                }
                if report.groups.is_empty() {
                    let secs = chrono::SecondsFormat::Secs;
                    eprintln!(
                        "no usage from {} to {}",
                        report.since.to_rfc3339_opts(secs, true),
                        report.until.to_rfc3339_opts(secs, true)
                    );
                }
            }
            if let Some((c, s)) = check {
                eprintln!(
                    "invariants {}: rows={} duplicate_request_ids={} keys_mismatched={} accounts_mismatched={}",
                    if c.holds() { "hold" } else { "VIOLATED" },
                    c.rows,
                    c.duplicate_request_ids,
                    c.keys_mismatched,
                    c.accounts_mismatched
                );
                eprintln!(
                    "spend invariants {}: balances={} balances_mismatched={} balances_overdrawn={} ledger_breaks={} ledger_orphans={} \
                     charges_missing={} budget_periods={} budget_periods_mismatched={} leases_mismatched={}",
                    if s.holds() { "hold" } else { "VIOLATED" },
                    s.balances,
                    s.balances_mismatched,
                    s.balances_overdrawn,
                    s.ledger_breaks,
                    s.ledger_orphans,
                    s.charges_missing,
                    s.budget_periods,
                    s.budget_periods_mismatched,
                    s.leases_mismatched
                );
                if !c.holds() {
                    bail!("metering invariants violated");
                }
                if !s.holds() {
                    bail!("spend invariants violated");
                }
            }
        }
    }
    Ok(())
}

/// `tollgate reload`: asks the running gateway's admin API to re-read its config file.
fn reload(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let token = std::env::var(crate::admin::TOKEN_ENV)
        .map_err(|_| anyhow::anyhow!("{} is not set", crate::admin::TOKEN_ENV))?;
    if addr.port() == 0 {
        bail!("[admin] listen has port 0, so the port is only known to the running gateway: pass --admin HOST:PORT (its 'tollgate ready' log line names it)");
    }
    let mut conn = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to the admin API at {addr}"))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(conn, "POST /admin/reload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if response.starts_with("HTTP/1.1 200") {
        eprintln!("config reloaded");
        Ok(())
    } else {
        bail!(
            "reload refused: {}",
            if body.is_empty() {
                response.lines().next().unwrap_or("")
            } else {
                body
            }
        )
    }
}

/// The local CLI's actor: `cli:<login name>` of the real user id (`cli:uid-<n>` without a
/// passwd entry). Not `$USER`, which any caller can set.
fn cli_actor() -> Actor {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid-{uid}"));
    Actor::cli(&name)
}

/// One audit row in a listing: when, who, what, to what, and what changed (`field: before →
/// after` for an update; the new state for a creation).
fn audit_line(r: &AuditRow) -> String {
    let target = format!("{}:{}", r.target_type, r.target_id);
    format!(
        "{:>6}  {}  {:<28} {:<24} {:<16} {}",
        r.id,
        r.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        r.actor,
        r.action,
        target,
        changes(r.before.as_ref(), r.after.as_ref())
    )
}

/// What changed between two snapshots, compactly.
fn changes(before: Option<&serde_json::Value>, after: Option<&serde_json::Value>) -> String {
    match (before, after) {
        (Some(serde_json::Value::Object(b)), Some(serde_json::Value::Object(a))) => {
            let null = serde_json::Value::Null;
            let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            let changed: Vec<String> = keys
                .into_iter()
                .filter_map(|k| {
                    let (was, is) = (b.get(k).unwrap_or(&null), a.get(k).unwrap_or(&null));
                    (was != is).then(|| format!("{k}: {was} → {is}"))
                })
                .collect();
            if changed.is_empty() {
                "no change".to_string()
            } else {
                changed.join(", ")
            }
        }
        (None, Some(a)) => format!("new {a}"),
        (Some(_), None) => "gone".to_string(),
        (Some(b), Some(a)) => format!("{b} → {a}"),
        (None, None) => String::new(),
    }
}

/// Names the command-line flag in a validation error (`base_url` → `--base-url`).
fn flag(e: ops::OpsError) -> anyhow::Error {
    match e {
        ops::OpsError::Invalid { field, message } => {
            anyhow::anyhow!("--{}: {message}", field.replace('_', "-"))
        }
        other => other.into(),
    }
}

fn active(a: bool) -> &'static str {
    if a {
        "active"
    } else {
        "inactive"
    }
}

/// Limits in a listing: `rpm:60,tpm:100000` (0 = no limit), or `unset` when none is set.
fn limits(l: &LimitColumns, unset: &str) -> String {
    let set: Vec<String> = [
        ("rpm", l.rpm),
        ("rpd", l.rpd),
        ("tpm", l.tpm),
        ("max_concurrent", l.max_concurrent),
    ]
    .iter()
    .filter_map(|(name, v)| v.map(|v| format!("{name}:{v}")))
    .collect();
    if set.is_empty() {
        unset.to_string()
    } else {
        set.join(",")
    }
}

/// An account's declared limits in a listing: `rpm:10,max_concurrent:2`, or `none`.
fn account_limits(l: &AccountLimitColumns) -> String {
    let set: Vec<String> = [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("max_concurrent", l.max_concurrent),
    ]
    .iter()
    .filter_map(|(name, v)| v.filter(|v| *v > 0).map(|v| format!("{name}:{v}")))
    .collect();
    if set.is_empty() {
        "none".to_string()
    } else {
        set.join(",")
    }
}

/// A key's permissions in a listing: `all` for `[]`, else the JSON array.
fn permissions(p: &serde_json::Value) -> String {
    match p.as_array() {
        Some(a) if a.is_empty() => "all".to_string(),
        _ => p.to_string(),
    }
}

/// One line per item on stdout (or a JSON array with `--json`). An empty table prints `empty`
/// on stderr, so that stdout stays empty for scripts.
fn print_list<T: serde::Serialize>(
    args: &ListArgs,
    items: &[T],
    empty: &str,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else if items.is_empty() {
        eprintln!("{empty}");
    } else {
        for item in items {
            println!("{}", line(item));
        }
    }
    Ok(())
}
