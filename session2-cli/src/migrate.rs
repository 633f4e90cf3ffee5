//! `session2 migrate FROM TO`: copy every live session between stores.
//!
//! Sessions keep their hashed keys, users, data, deadlines and versions, so
//! users stay logged in when an application moves to another store. Copies
//! go through the store contract: `create` for a session the target lacks,
//! compare-and-swap for one the target holds at an older version, nothing
//! for one it holds at the same or a newer version. Re-running is therefore
//! harmless, and a migration interrupted half-way can simply be run again.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;
use session2::{Clock, CreateOutcome, SessionStore, SystemClock};

use crate::admin::elapsed;
use crate::output::progress_bar;

/// What a migration did, session by session.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Summary {
    pub(crate) copied: u64,
    pub(crate) updated: u64,
    pub(crate) unchanged: u64,
    pub(crate) expired: u64,
}

pub(crate) async fn migrate(
    from: Arc<dyn SessionStore>,
    to: Arc<dyn SessionStore>,
    batch: usize,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    to.setup()
        .await
        .context("failed to set up the target store")?;
    let total = from
        .count()
        .await
        .context("failed to count the source's sessions")?;
    let bar = progress_bar(total, "migrating");
    let mut summary = Summary::default();
    let mut after = None;
    loop {
        let page = from
            .list(after.as_ref(), batch)
            .await
            .context("failed to read sessions from the source")?;
        for (key, record) in &page.records {
            let now = SystemClock.now();
            bar.inc(1);
            if record.is_expired_at(now) {
                summary.expired += 1;
                continue;
            }
            let mut record = record.clone();
            // A lease belongs to a request running against the old store.
            record.lease = None;
            let write_failed = || {
                format!(
                    "failed to write session {} to the target",
                    key.fingerprint()
                )
            };
            if to
                .create(key, &record, now)
                .await
                .with_context(write_failed)?
                == CreateOutcome::Created
            {
                summary.copied += 1;
                continue;
            }
            match to.load(key, now).await.with_context(write_failed)? {
                Some(existing) if existing.version < record.version => {
                    if to
                        .replace(key, existing.version, &record, now)
                        .await
                        .with_context(write_failed)?
                    {
                        summary.updated += 1;
                    } else {
                        // Changed in the target meanwhile: the target's copy is live, keep it.
                        summary.unchanged += 1;
                    }
                }
                _ => summary.unchanged += 1,
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "migrated {} session(s) from `{}` to `{}` in {}: {} copied, {} updated, {} already up to date, {} expired skipped",
            summary.copied + summary.updated + summary.unchanged + summary.expired,
            from.name(),
            to.name(),
            elapsed(started.elapsed()),
            summary.copied,
            summary.updated,
            summary.unchanged,
            summary.expired
        );
    }
    Ok(())
}
