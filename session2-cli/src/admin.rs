//! The administration commands: list, show, count, stats, purge, logout-user.
//!
//! They work on every store through the store contract alone, page through
//! records with bounded memory, and never print a raw session id (stores do
//! not have one): sessions are named by the fingerprint of their hashed key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use session2::{Clock, Record, SessionKey, SessionStore, SystemClock, Timestamp};

use crate::output::{format_time, progress_spinner, size_text};

/// Records read per `list` call while scanning a whole store.
const SCAN_PAGE: usize = 500;

/// The state of a stored session at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum State {
    Live,
    IdleExpired,
    AbsoluteExpired,
}

impl State {
    pub(crate) fn of(record: &Record, now: Timestamp) -> Self {
        if record
            .absolute_deadline
            .is_some_and(|deadline| deadline <= now)
        {
            Self::AbsoluteExpired
        } else if record.idle_deadline <= now {
            Self::IdleExpired
        } else {
            Self::Live
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::IdleExpired => "idle-expired",
            Self::AbsoluteExpired => "absolute-expired",
        }
    }
}

/// One session as the admin commands show it.
#[derive(Debug, Serialize)]
struct SessionRow {
    fingerprint: String,
    key: String,
    user: Option<String>,
    created_at: String,
    accessed_at: String,
    idle_deadline: String,
    absolute_deadline: Option<String>,
    size: usize,
    version: u64,
    locked: bool,
    state: State,
}

impl SessionRow {
    fn new(key: &SessionKey, record: &Record, now: Timestamp) -> Self {
        Self {
            fingerprint: key.fingerprint(),
            key: key.to_hex(),
            user: record.user.clone(),
            created_at: format_time(record.created_at),
            accessed_at: format_time(record.accessed_at),
            idle_deadline: format_time(record.idle_deadline),
            absolute_deadline: record.absolute_deadline.map(format_time),
            size: record.data.len(),
            version: record.version,
            locked: record.lease.is_some_and(|lease| lease.is_held_at(now)),
            state: State::of(record, now),
        }
    }
}

/// Calls `visit` on every record of the store, page by page.
pub(crate) async fn scan(
    store: &dyn SessionStore,
    mut visit: impl FnMut(&SessionKey, &Record),
) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        let page = store.list(after.as_ref(), SCAN_PAGE).await?;
        for (key, record) in &page.records {
            visit(key, record);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(()),
        }
    }
}

pub(crate) async fn list(
    store: Arc<dyn SessionStore>,
    user: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let rows: Vec<SessionRow> = match &user {
        Some(user) => store
            .find_by_user(user, now)
            .await?
            .iter()
            .take(limit)
            .map(|(key, record)| SessionRow::new(key, record, now))
            .collect(),
        None => store
            .list(None, limit)
            .await?
            .records
            .iter()
            .map(|(key, record)| SessionRow::new(key, record, now))
            .collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<12}  {:<20}  {:<20}  {:<20}  {:<20}  {:<20}  {:>9}  STATE",
        "FINGERPRINT", "USER", "CREATED", "LAST ACCESS", "IDLE UNTIL", "ABSOLUTE UNTIL", "SIZE"
    );
    for row in &rows {
        println!(
            "{:<12}  {:<20}  {:<20}  {:<20}  {:<20}  {:<20}  {:>9}  {}",
            row.fingerprint,
            truncate(row.user.as_deref().unwrap_or("-"), 20),
            row.created_at,
            row.accessed_at,
            row.idle_deadline,
            row.absolute_deadline.as_deref().unwrap_or("-"),
            size_text(row.size),
            row.state.label(),
        );
    }
    println!("{} session(s) shown", rows.len());
    Ok(())
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(width - 1).collect();
        short.push('…');
        short
    }
}

pub(crate) async fn show(
    store: Arc<dyn SessionStore>,
    fingerprint: &str,
    json: bool,
) -> anyhow::Result<()> {
    let prefix = fingerprint.to_ascii_lowercase();
    if prefix.len() < 6 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(crate::UsageError(format!(
            "`{fingerprint}` is not a fingerprint: give at least 6 hex digits, as `session2 list` shows them"
        )));
    }
    let mut matches = Vec::new();
    scan(&*store, |key, record| {
        if key.to_hex().starts_with(&prefix) {
            matches.push((*key, record.clone()));
        }
    })
    .await?;
    let (key, record) = match matches.len() {
        1 => matches.remove(0),
        0 => bail!("no session has the fingerprint `{prefix}`"),
        n => bail!("{n} sessions start with `{prefix}`; give more digits"),
    };
    let now = SystemClock.now();
    let row = SessionRow::new(&key, &record, now);
    let data: serde_json::Value = serde_json::from_slice(&record.data).unwrap_or_else(|_| {
        serde_json::Value::String(format!("<{} undecodable bytes>", record.data.len()))
    });
    if json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            row: &'a SessionRow,
            data: &'a serde_json::Value,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Shown {
                row: &row,
                data: &data
            })?
        );
        return Ok(());
    }
    println!("fingerprint     {}", row.fingerprint);
    println!("key (sha-256)   {}", row.key);
    println!("state           {}", row.state.label());
    println!("user            {}", row.user.as_deref().unwrap_or("-"));
    println!("created         {}", row.created_at);
    println!("last access     {}", row.accessed_at);
    println!("idle until      {}", row.idle_deadline);
    println!(
        "absolute until  {}",
        row.absolute_deadline.as_deref().unwrap_or("-")
    );
    println!("version         {}", row.version);
    println!("locked          {}", if row.locked { "yes" } else { "no" });
    println!("size            {}", size_text(row.size));
    println!("data            {}", serde_json::to_string_pretty(&data)?);
    Ok(())
}

pub(crate) async fn count(store: Arc<dyn SessionStore>) -> anyhow::Result<()> {
    let count = store.count().await?;
    println!("{count}");
    Ok(())
}

#[derive(Debug, Default, Serialize)]
struct Stats {
    total: u64,
    live: u64,
    idle_expired: u64,
    absolute_expired: u64,
    locked: u64,
    with_user: u64,
    by_age: AgeBuckets,
    size_bytes: SizeStats,
    top_users: Vec<UserCount>,
}

#[derive(Debug, Default, Serialize)]
struct AgeBuckets {
    under_1_hour: u64,
    under_1_day: u64,
    under_1_week: u64,
    older: u64,
}

#[derive(Debug, Default, Serialize)]
struct SizeStats {
    total: u64,
    min: usize,
    median: usize,
    p90: usize,
    p99: usize,
    max: usize,
}

#[derive(Debug, Serialize)]
struct UserCount {
    user: String,
    sessions: u64,
}

pub(crate) async fn stats(
    store: Arc<dyn SessionStore>,
    top: usize,
    json: bool,
) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let mut stats = Stats::default();
    let mut sizes = Vec::new();
    let mut users: HashMap<String, u64> = HashMap::new();
    scan(&*store, |_, record| {
        stats.total += 1;
        match State::of(record, now) {
            State::Live => stats.live += 1,
            State::IdleExpired => stats.idle_expired += 1,
            State::AbsoluteExpired => stats.absolute_expired += 1,
        }
        if record.lease.is_some_and(|lease| lease.is_held_at(now)) {
            stats.locked += 1;
        }
        let age = now.duration_since(record.created_at);
        let bucket = match age.as_secs() {
            0..3_600 => &mut stats.by_age.under_1_hour,
            3_600..86_400 => &mut stats.by_age.under_1_day,
            86_400..604_800 => &mut stats.by_age.under_1_week,
            _ => &mut stats.by_age.older,
        };
        *bucket += 1;
        sizes.push(record.data.len());
        if let Some(user) = &record.user {
            stats.with_user += 1;
            *users.entry(user.clone()).or_default() += 1;
        }
    })
    .await?;
    sizes.sort_unstable();
    let percentile = |p: usize| {
        sizes
            .get((sizes.len().saturating_sub(1)) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    stats.size_bytes = SizeStats {
        total: sizes.iter().map(|&size| size as u64).sum(),
        min: sizes.first().copied().unwrap_or(0),
        median: percentile(50),
        p90: percentile(90),
        p99: percentile(99),
        max: sizes.last().copied().unwrap_or(0),
    };
    let mut top_users: Vec<UserCount> = users
        .into_iter()
        .map(|(user, sessions)| UserCount { user, sessions })
        .collect();
    top_users.sort_by(|a, b| {
        b.sessions
            .cmp(&a.sessions)
            .then_with(|| a.user.cmp(&b.user))
    });
    top_users.truncate(top);
    stats.top_users = top_users;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    let line = |label: &str, value: String| println!("{label:<20}{value}");
    line("sessions", stats.total.to_string());
    line("  live", stats.live.to_string());
    line("  idle-expired", stats.idle_expired.to_string());
    line("  absolute-expired", stats.absolute_expired.to_string());
    line("  locked now", stats.locked.to_string());
    line("  with a user", stats.with_user.to_string());
    let ages = &stats.by_age;
    line(
        "by age",
        format!(
            "<1h {}  <1d {}  <1w {}  older {}",
            ages.under_1_hour, ages.under_1_day, ages.under_1_week, ages.older
        ),
    );
    let sizes = &stats.size_bytes;
    line(
        "size",
        format!(
            "total {}  min {}  median {}  p90 {}  p99 {}  max {}",
            size_text(usize::try_from(sizes.total).unwrap_or(usize::MAX)),
            size_text(sizes.min),
            size_text(sizes.median),
            size_text(sizes.p90),
            size_text(sizes.p99),
            size_text(sizes.max)
        ),
    );
    println!("top users");
    for user in &stats.top_users {
        println!("  {:>6}  {}", user.sessions, user.user);
    }
    Ok(())
}

pub(crate) async fn purge(store: Arc<dyn SessionStore>, dry_run: bool) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let started = Instant::now();
    if dry_run {
        let mut expired = 0u64;
        scan(&*store, |_, record| {
            expired += u64::from(record.is_expired_at(now))
        })
        .await?;
        println!("{expired} expired session(s) would be purged (dry run; nothing deleted)");
        return Ok(());
    }
    let spinner = progress_spinner("purging expired sessions");
    let purged = store.purge_expired(now).await;
    spinner.finish_and_clear();
    let purged = purged?;
    println!(
        "purged {purged} expired session(s) in {}",
        elapsed(started.elapsed())
    );
    Ok(())
}

pub(crate) async fn logout_user(store: Arc<dyn SessionStore>, user: &str) -> anyhow::Result<()> {
    let now = SystemClock.now();
    let sessions = store.find_by_user(user, now).await?;
    let mut deleted = 0;
    for (key, _) in &sessions {
        if store.delete(key, None).await? {
            deleted += 1;
        }
    }
    println!("logged out `{user}` everywhere: {deleted} session(s) deleted");
    Ok(())
}

pub(crate) fn elapsed(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}
