//! [`RedisStore`]: sessions in Redis or a Redis Cluster, shared by every process and machine.
//!
//! | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
//! |---|---|---|---|---|
//! | as Redis is configured (RDB/AOF) | yes | yes | yes: `PEXPIREAT` per session, plus purge | yes: one Lua script |
//!
//! See [`RedisStore`] for the key layout, Redis Cluster use and expiry.
//!
//! ```no_run
//! use session2::{SessionManager, store::RedisStore};
//!
//! # async fn run() -> session2::Result<()> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379")
//!     .await?
//!     .with_prefix("myapp");
//! let manager = SessionManager::new(store);
//! # let _ = manager;
//! # Ok(()) }
//! ```

use std::fmt;
use std::io::{self, Write as _};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisWrite as _, Script, Value};

use crate::store::writer::{
    Batching, Queue, SessionJob, SwapJob, Writers, answer_all, run_batches,
};
use crate::store::{Capabilities, CreateOutcome, LeaseOutcome, Page, SessionStore};
use crate::{Error, Lease, Record, Result, SessionKey, Timestamp};

const STORE: &str = "redis";
const DEFAULT_PREFIX: &str = "session2";
/// Expired sessions one purge script deletes before yielding to other clients.
const PURGE_BATCH: usize = 1_000;
/// The most records one [`SessionStore::list`] page returns.
const MAX_PAGE: usize = 100_000;
/// The most saves one batch script makes.
const MAX_SWAPS: usize = 256;
/// The most loads one `MGET` reads.
const MAX_LOADS: usize = 256;
/// How many `MGET`s the loader has in flight at most. With one, loads wait
/// a round trip per batch, which capped store-level loads in an earlier
/// build; without a limit, each batch goes out with one or two loads (1.8
/// on average, measured over HTTP) and saves little. With two, batches held
/// about 12 loads and store-level loads kept their rate.
const LOAD_BATCHES_IN_FLIGHT: usize = 2;
/// How many batch scripts of saves the writer has in flight at most, for
/// the same reason. Redis runs them in the order they were sent, and no
/// save of one depends on another's outcome: a save's expected version
/// comes from a load or an answered save, never from one still in flight.
const SWAP_BATCHES_IN_FLIGHT: usize = 2;
/// How long at most a session's key outlives the session in Redis: see
/// [`key_expiry`].
const KEY_EXPIRY_SLACK: Duration = Duration::from_secs(3600);

/// A script: the store's names (see [`RedisStore::script_call`]), the
/// prelude, the parts it uses (`["redis_index.lua", "redis_write.lua"]`,
/// each in the order it needs them), then its body.
macro_rules! script {
    ([$($part:literal),*], $body:literal) => {
        concat!(
            include_str!("redis_names.lua"),
            include_str!("redis_prelude.lua"),
            $(include_str!($part),)*
            $body
        )
    };
    ($body:literal) => {
        script!([], $body)
    };
}

/// ARGV[3] = hex, ARGV[4] = now, ARGV[5..8] = the record to write (see [`push_record`]).
const CREATE: &str = script!(
    ["redis_index.lua", "redis_write.lua"],
    r"
return create(ARGV[3], 5, ARGV[4] + 0) and 1 or 0
"
);

/// ARGV[3] = new hex, ARGV[4] = now, ARGV[5] = old hex, ARGV[6] = the old
/// session's expected version, ARGV[7..10] = the record. `CREATE` of the
/// new session and `DELETE` of the old in one script: one round trip, and
/// at every moment the session is under exactly one key. A session's own
/// key is never free for it (`create` would take it, then the old key's
/// removal would drop it).
const RENAME: &str = script!(
    ["redis_index.lua", "redis_write.lua"],
    r"
if ARGV[3] == ARGV[5] then return 0 end
local old, version, _, user = current(sprefix .. ARGV[5])
if not old or version ~= ARGV[6] then return 0 end
if not create(ARGV[3], 7, ARGV[4] + 0) then return 0 end
remove(ARGV[5], user)
return 1
"
);

/// ARGV[3] = hex, ARGV[4] = now, ARGV[5] = expected version, ARGV[6..9] = the record.
const REPLACE: &str = script!(
    ["redis_write.lua"],
    r"
return swap(sprefix .. ARGV[3], 6, ARGV[4] + 0, ARGV[5]) and 1 or 0
"
);

/// ARGV[3..]: for each save, seven arguments: the session's key name (not
/// its hex: a script that joins the two makes a new Lua string per save),
/// now, expected version and the record (see [`push_record`]).
/// Returns one string of `1` or `0` per save, in order: each is the
/// `REPLACE` above, run after the ones before it (a later save of the same
/// session sees the earlier one's write). One string, not an array: redis-rs
/// parses each element of an array reply on its own.
const REPLACE_MANY: &str = script!(
    ["redis_write.lua"],
    r"
local swapped = {}
-- Saves of a batch mostly share their millisecond: its number is reused
-- (Lua strings are interned, so `~=` compares two pointers).
local now_text, now
for i = 3, #ARGV, 7 do
  if ARGV[i + 1] ~= now_text then now_text = ARGV[i + 1]; now = now_text + 0 end
  swapped[#swapped + 1] = swap(ARGV[i], i + 3, now, ARGV[i + 2]) and '1' or '0'
end
return table.concat(swapped)
"
);

/// KEYS[1] = the session's key, ARGV[1] = now, ARGV[2] = lease token,
/// ARGV[3] = lease until: the one script without the store's names, which
/// it does not use (one for every exclusive request; see
/// [`RedisStore::session_script_call`]).
/// Returns 0 when missing, 3 when unreadable (the caller's `load` reports
/// it), else one string: `1` when another lease binds or `2` when taken,
/// then the session's string as stored (see [`decode_stored`]).
const LEASE: &str = concat!(
    include_str!("redis_prelude.lua"),
    r"
local skey = KEYS[1]
local now = ARGV[1] + 0
local record, digits, expires_at, _, at = current(skey)
if record == false then return 3 end
if not record or expires_at + 0 <= now then return 0 end
local absolute, lease_until, rest = string.match(record, '^(%-?%d*)|%d*|(%-?%d*)|()', at)
if not rest then return 3 end
if lease_until ~= '' and lease_until + 0 > now then return '1' .. record end
-- The version is a decimal u64: add one digit by digit, beyond Lua's
-- exact doubles; nine times in ten only the last digit moves.
local last, version = string.byte(digits, -1)
if last < 57 then
  version = string.sub(digits, 1, -2) .. string.char(last + 1)
else
  local i = #digits
  while i > 0 and string.sub(digits, i, i) == '9' do i = i - 1 end
  version = i == 0 and '1' .. string.rep('0', #digits)
    or string.sub(digits, 1, i - 1) .. string.char(string.byte(digits, i) + 1) .. string.rep('0', #digits - i)
end
local leased = version .. string.sub(record, #digits + 1, at - 1)
  .. absolute .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. string.sub(record, rest)
redis.call('SET', skey, leased, 'KEEPTTL')
return '2' .. leased
"
);

/// ARGV[3] = hex, ARGV[4] = expected version or '' for any.
const DELETE: &str = script!(
    ["redis_index.lua"],
    r"
local hex = ARGV[3]
local cur, version, _, user = current(sprefix .. hex)
if cur == nil then
  unindex(hex)
  return 0
end
if ARGV[4] ~= '' and (not cur or version ~= ARGV[4]) then return 0 end
remove(hex, user)
return 1
"
);

/// ARGV[3] = hex, ARGV[4] = accessed_at, ARGV[5] = idle_deadline,
/// ARGV[6] = when Redis should drop the key, chosen from the idle deadline
/// (see [`key_expiry`]); an earlier absolute deadline wins over both.
const TOUCH: &str = script!(
    ["redis_write.lua"],
    r"
local hex = ARGV[3]
local skey = sprefix .. hex
local record, version, current_expiry, _, at = current(skey)
if not record or current_expiry + 0 <= ARGV[4] + 0 then return 0 end
-- Kept: the absolute deadline, the lease and created_at; then the two rewritten.
local kept, absolute, rest = string.match(record, '^((%-?%d*)|%d*|%-?%d*|%-?%d+|)%-?%d+|%-?%d+|()', at)
if not rest then return 0 end
local expires_at, ttl_at = ARGV[5], ARGV[6]
if absolute ~= '' and absolute + 0 < expires_at + 0 then expires_at, ttl_at = absolute, absolute end
index_expiry(hex, expires_at, current_expiry + 0)
local touched = version .. '|' .. expires_at .. string.sub(record, #version + #current_expiry + 2, at - 1)
  .. kept .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. string.sub(record, rest)
redis.call('SET', skey, touched, 'PXAT', ttl_at)
return 1
"
);

/// ARGV[3] = now, ARGV[4] = batch size. Returns {deleted, examined}.
/// The due sessions are read together; one that cannot be read goes (a
/// failed `load` put it in the index as due). Each session names its user,
/// and the owner index those of sessions that vanished or cannot be read.
/// The deletes and index removals of the whole batch go in a few
/// multi-key commands.
const PURGE: &str = script!(
    r"
local now = ARGV[3] + 0
local due = redis.call('ZRANGEBYSCORE', exp, '-inf', ARGV[3], 'LIMIT', 0, ARGV[4])
if #due == 0 then return { 0, 0 } end
local skeys = {}
for i, hex in ipairs(due) do skeys[i] = sprefix .. hex end
-- One MGET for the batch: every `redis.call` costs a script far more than
-- the command itself. It answers nil for a key that is missing or not a
-- string (a hash of earlier builds), which is then read alone.
local stored = redis.call('MGET', unpack(skeys))
-- Tables grow by index: `table.insert` is a global lookup and a C call
-- per session. `gone` and `names` grow together, `n` long.
local gone, names, owned, by_user, unknown, n = {}, {}, {}, {}, {}, 0
local function owner(hex, user)
  owned[#owned + 1] = hex
  local hexes = by_user[user]
  if not hexes then hexes = {}; by_user[user] = hexes end
  hexes[#hexes + 1] = hex
end
for i, hex in ipairs(due) do
  local skey, record, version, expires_at, user = skeys[i], stored[i]
  -- Most sessions have no user: one capture of the head decides them,
  -- sparing the strings `parse` makes of the version and user length.
  expires_at = record and string.match(record, '^%d+|(%-?%d+)||')
  if expires_at then
    version, user = true, false
  elseif record then
    version, expires_at, user = parse(record)
  else
    record, version, expires_at, user = current(skey)
  end
  if version and expires_at + 0 > now then
    -- Its entry ran early (see `index_expiry`): move it to the real expiry.
    redis.call('ZADD', exp, expires_at, hex)
  else
    n = n + 1
    gone[n], names[n] = hex, skey
    if user then
      owner(hex, user)
    elseif not version then
      -- Vanished or unreadable: only the owner index knows its user.
      unknown[#unknown + 1] = hex
    end
  end
end
if n == 0 then return { 0, #due } end
local deleted = redis.call('DEL', unpack(names))
-- The entries of `gone` are the first of the index now: the moved ones
-- went past `now`, behind every entry not yet looked at.
redis.call('ZREMRANGEBYRANK', exp, 0, n - 1)
redis.call('ZREM', keys, unpack(gone))
if #unknown > 0 then
  local users = redis.call('HMGET', owners, unpack(unknown))
  for i, hex in ipairs(unknown) do
    if users[i] then owner(hex, users[i]) end
  end
end
if #owned > 0 then redis.call('HDEL', owners, unpack(owned)) end
for user, hexes in pairs(by_user) do redis.call('SREM', uprefix .. user, unpack(hexes)) end
return { deleted, #due }
"
);

/// Drops index entries of sessions Redis expired by itself (their expiry is
/// behind the server's clock and their key is gone), then counts.
const COUNT: &str = script!(
    ["redis_index.lua"],
    r"
local time = redis.call('TIME')
local server_now = time[1] * 1000 + math.floor(time[2] / 1000)
for _, hex in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', server_now)) do
  if redis.call('EXISTS', sprefix .. hex) == 0 then unindex(hex) end
end
return redis.call('ZCARD', keys)
"
);

/// ARGV[3] = first bound for ZRANGEBYLEX, ARGV[4] = entries wanted.
/// Returns {hex, session} pairs in key order, skipping vanished sessions;
/// each session as stored (see [`decode_stored`]).
const LIST: &str = script!(
    ["redis_index.lua"],
    r"
local out = {}
local start = ARGV[3]
local want = ARGV[4] + 0
while #out < want do
  local batch = redis.call('ZRANGEBYLEX', keys, start, '+', 'LIMIT', 0, want - #out)
  if #batch == 0 then break end
  for _, hex in ipairs(batch) do
    local record = fetch(hex)
    if record then table.insert(out, { hex, record }) end
  end
  start = '(' .. batch[#batch]
end
return out
"
);

/// KEYS[4] = the user's set. Returns {hex, session} pairs of its sessions;
/// each session as stored (see [`decode_stored`]).
const FIND_BY_USER: &str = script!(
    ["redis_index.lua"],
    r"
local out = {}
for _, hex in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local record = fetch(hex)
  if record then
    table.insert(out, { hex, record })
  else
    redis.call('SREM', KEYS[4], hex)
  end
end
return out
"
);

/// ARGV[3] = hex. Puts a record the client cannot read in the indexes,
/// due at once: the next purge deletes it if the scripts cannot read it
/// either or it has expired, else moves it to its expiry (as it would a
/// session rewritten meanwhile) and deletes it then.
const QUARANTINE: &str = script!(
    r"
local hex = ARGV[3]
if redis.call('EXISTS', sprefix .. hex) == 0 then return 0 end
redis.call('ZADD', exp, '-inf', hex)
redis.call('ZADD', keys, 0, hex)
return 1
"
);

/// The scripts, hashed once per store.
struct Scripts {
    create: Script,
    rename: Script,
    replace: Script,
    replace_many: Script,
    lease: Script,
    delete: Script,
    touch: Script,
    purge: Script,
    count: Script,
    list: Script,
    find_by_user: Script,
    quarantine: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            create: Script::new(CREATE),
            rename: Script::new(RENAME),
            replace: Script::new(REPLACE),
            replace_many: Script::new(REPLACE_MANY),
            lease: Script::new(LEASE),
            delete: Script::new(DELETE),
            touch: Script::new(TOUCH),
            purge: Script::new(PURGE),
            count: Script::new(COUNT),
            list: Script::new(LIST),
            find_by_user: Script::new(FIND_BY_USER),
            quarantine: Script::new(QUARANTINE),
        }
    }
}

/// A connection to one Redis server or to a Redis Cluster.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// A store in Redis (or a Redis Cluster); clones share the connection.
///
/// | persistent | multiprocess safe | thread safe | server-side expiry | atomic create |
/// |---|---|---|---|---|
/// | as Redis is configured (RDB/AOF) | yes | yes | yes: `PXAT` per session, plus purge | yes: one Lua script |
///
/// Use it when several workers or machines serve one application and Redis
/// (6.2 or later, or Valkey; [`setup`](SessionStore::setup) refuses an
/// older server) is already at hand. Build it from the application's own
/// [`ConnectionManager`] ([`RedisStore::new`]) or cluster connection
/// ([`RedisStore::from_cluster`]), or from a URL ([`RedisStore::connect`],
/// or `redis://host/db?prefix=app` through [`store::open`](crate::store::open)).
///
/// # Layout
///
/// With the default prefix `session2`, one store uses these keys:
///
/// | key | type | holds |
/// |---|---|---|
/// | `{session2}:s:<hex key>` | string | one session: its metadata as decimal text, then its `data` blob (binary), expiring (`PXAT`) at or after the session |
/// | `{session2}:exp` | sorted set | every session, scored by its expiry in Unix milliseconds or earlier |
/// | `{session2}:keys` | sorted set | every session, score 0, so `ZRANGEBYLEX` pages through keys in order |
/// | `{session2}:owner` | hash | session → user, for sessions that have a user |
/// | `{session2}:u:<user>` | set | the sessions of one user |
///
/// Every key carries the same hash tag (`{session2}`), so **one store lives
/// in one hash slot** of a Redis Cluster: each operation is a single Lua
/// script that changes a session and its indexes atomically, and Redis runs
/// a script only over keys of one slot. To spread sessions over a cluster,
/// run several stores with different prefixes.
///
/// A session is one string, its metadata as decimal text first and its
/// data last:
///
/// ```text
/// version|expires_at|user length|<user>absolute_deadline|lease_token|lease_until|created_at|accessed_at|idle_deadline|<data>
/// ```
///
/// (absent values are empty). A load is one `GET` (or a share of an
/// `MGET`: see below), and a save one `SET` (see the batches below). That
/// costs Redis and the client less than a hash's ten fields. The scripts
/// read the metadata with Lua patterns and never decode the data.
/// Sessions that earlier session2 builds wrote as hashes are read as they
/// are, and their next write replaces the hash with the string.
///
/// # Expiry
///
/// Redis deletes a session's key by itself soon after the session expires,
/// so dead sessions' data never piles up even when nobody purges: every
/// write sets the key's `PXAT` past the session's expiry by its remaining
/// lifetime, at most an hour. A key may thus outlive its session by up to
/// an hour in Redis (reads and purge go by the session's own expiry, so it
/// is dead to them), never end before it. Every decision about expiry in the
/// scripts uses the `now` the caller passes, never the server's clock;
/// [`purge_expired`](SessionStore::purge_expired) walks the expiry index up
/// to `now` and deletes exactly those sessions and their index entries.
/// A save that only moves a session's expiry later leaves its index entry
/// where it was, and purge moves the entry when it meets the session still
/// alive: one index write per session and idle period instead of one per
/// request, so a save is one command (`SET … GET`) unless the user
/// changes or the expiry moves back.
/// Index entries left behind by sessions Redis expired by itself are dropped
/// when reads ([`list`](SessionStore::list), [`count`](SessionStore::count),
/// [`find_by_user`](SessionStore::find_by_user)) or purges meet them, so run
/// purge regularly to keep the indexes small.
/// Listing pages through the key index (never `KEYS` or `SCAN`);
/// [`count`](SessionStore::count) is exact: `ZCARD` of the key index after
/// dropping the entries whose session Redis already expired.
///
/// Concurrent saves are batched: a writer task (per runtime) sends the
/// saves that queued while its last scripts ran as one script, with up to
/// two such scripts in flight, which makes each compare-and-swap in order,
/// as its own script would (a later save of the same session sees the
/// earlier one's write). The script's fixed cost, several times that of a
/// `SET`, is then paid once per batch. While only a few saves (or loads)
/// are under way, there is little to batch: each runs on its caller's
/// task, with no hand-off to the writer and back, up to four at once. It writes
/// first (`SET … GET`) and puts back an old session that does not qualify,
/// so a failed save shows in keyspace notifications as two writes. If the
/// batch script fails (the server goes away), every save of it gets the
/// error; a script that fails midway keeps the saves before the failure, as
/// Redis keeps a script's writes, so a caller told of an error may find its
/// save made, as after a reply lost on the network.
///
/// A lease (of [`ExclusiveSession`](crate::ExclusiveSession)) reads a
/// session and writes it back changed in one script: one round trip, on
/// the multiplexed connection. (Earlier builds batched leases in an
/// optimistic transaction on a second connection: `WATCH` and `MGET`, then
/// `MULTI` … `EXEC`. That cost Redis less per lease under heavy load, but
/// two round trips where the script takes one, and exclusive requests made
/// 1.05 to 1.47 times as many requests per second by script, at 8 to 128
/// users, in paired runs.)
///
/// [`load`](SessionStore::load) reads the session's string: the loads that
/// queue while the store's loader is busy go together in one `MGET` (a key
/// it finds empty, which may hold a hash of an earlier build, is read again
/// alone). A session that cannot be decoded (or a foreign value under its
/// key) fails it with a decode error and is put in the expiry index as
/// already due, so the next purge deletes it.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    keys: KeyNames,
    scripts: std::sync::Arc<Scripts>,
    /// The writers that batch saves, shared by the clones.
    writers: std::sync::Arc<Writers<SwapJob>>,
    /// The loaders that batch loads, shared by the clones.
    loaders: std::sync::Arc<Writers<LoadJob>>,
    /// Sessions one purge script looks at: [`PURGE_BATCH`] (tests make it small).
    purge_batch: usize,
}

/// The names of the store's keys, all in one hash slot.
#[derive(Clone, Debug)]
struct KeyNames {
    prefix: String,
    session_prefix: String,
    user_prefix: String,
    expiry: String,
    keys: String,
    owners: String,
}

impl KeyNames {
    fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}}}:");
        Self {
            prefix: prefix.to_owned(),
            session_prefix: format!("{tag}s:"),
            user_prefix: format!("{tag}u:"),
            expiry: format!("{tag}exp"),
            keys: format!("{tag}keys"),
            owners: format!("{tag}owner"),
        }
    }

    fn session(&self, key: &SessionKey) -> String {
        let hex = key.hex_bytes();
        let mut name = String::with_capacity(self.session_prefix.len() + hex.len());
        name.push_str(&self.session_prefix);
        name.push_str(SessionKey::hex_text(&hex));
        name
    }

    /// The length of a session's key name.
    fn session_length(&self) -> usize {
        self.session_prefix.len() + 2 * std::mem::size_of::<SessionKey>()
    }

    /// Appends the name of `key`'s session as the next argument of `call`,
    /// written in place rather than built as a `String` first.
    fn push_session(&self, call: &mut Cmd, key: &SessionKey) {
        let mut name = call.writer_for_next_arg();
        in_memory(
            name.write_all(self.session_prefix.as_bytes())
                .and_then(|()| name.write_all(&key.hex_bytes())),
        );
    }

    fn user(&self, user: &str) -> Vec<u8> {
        let mut name = self.user_prefix.as_bytes().to_vec();
        name.extend_from_slice(user.as_bytes());
        name
    }
}

/// What the lease script found.
#[derive(Debug)]
enum LeaseReply {
    /// Decided: missing, held or taken.
    Decided(LeaseOutcome),
    /// The session cannot be read; `load` reports why (and marks it for purge).
    Unreadable,
}

/// A load queued for a loader, and where what it read goes.
struct LoadJob {
    key: SessionKey,
    reply: tokio::sync::oneshot::Sender<Result<Read>>,
}

/// What a load read under a session's key.
#[derive(Debug)]
enum Read {
    /// From a batch's `MGET`: the stored string, or nil for a key that is
    /// missing or holds no string (a hash of earlier builds) alike.
    Batched(Value),
    /// From a `GET` alone, which tells the two apart: nil for a missing
    /// key, `WRONGTYPE` for one that holds no string.
    Alone(redis::RedisResult<Value>),
}

impl SessionJob for LoadJob {
    fn key(&self) -> &SessionKey {
        &self.key
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.connection {
            Connection::Single(_) => "single",
            Connection::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("connection", &kind)
            .field("prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

/// Whether `prefix` can name a store: non-empty (after dropping a trailing
/// `:`) and without braces, so that the hash tag `{prefix}` is the whole prefix.
pub(super) fn check_prefix(prefix: &str) -> Result<()> {
    let prefix = prefix.trim_end_matches(':');
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(Error::config(format_args!(
            "redis key prefix `{prefix}` must be non-empty and contain no `{{` or `}}`"
        )));
    }
    Ok(())
}

/// The oldest Redis the store's scripts run on: `SET … GET` and `PXAT`
/// came in 6.2.
const OLDEST_SERVER: (u32, u32) = (6, 2);

/// Refuses, with a config error, a server older than [`OLDEST_SERVER`] by
/// its `INFO server` reply (a cluster's names each node: the oldest
/// decides). A reply without a readable `redis_version` passes: managed
/// servers may hide it, and the scripts' own errors then tell.
fn check_server_version(info: &Value) -> Result<()> {
    let texts = info_texts(info);
    let oldest = texts.iter().filter_map(|text| server_version(text)).min();
    match oldest {
        Some((major, minor, full)) if (major, minor) < OLDEST_SERVER => {
            Err(Error::config(format_args!(
                "the Redis server is version {full}, and RedisStore needs {}.{} or later (its scripts use SET … GET and PXAT)",
                OLDEST_SERVER.0, OLDEST_SERVER.1
            )))
        }
        _ => Ok(()),
    }
}

/// The texts of an `INFO` reply: one, or one per node of a cluster.
fn info_texts(reply: &Value) -> Vec<String> {
    match reply {
        Value::BulkString(bytes) => vec![String::from_utf8_lossy(bytes).into_owned()],
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => vec![text.clone()],
        Value::Array(items) | Value::Set(items) => items.iter().flat_map(info_texts).collect(),
        Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(_, value)| info_texts(value))
            .collect(),
        _ => Vec::new(),
    }
}

/// The major and minor `redis_version` of one `INFO` text, and the whole.
fn server_version(info: &str) -> Option<(u32, u32, &str)> {
    let full = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = full.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, full))
}

impl RedisStore {
    /// A store on the application's own connection, with the default
    /// prefix `session2`.
    pub fn new(connection: ConnectionManager) -> Self {
        Self::with_connection(Connection::Single(connection))
    }

    /// A store on a Redis Cluster connection, with the default prefix
    /// `session2`. The whole store lives in the hash slot of its prefix.
    pub fn from_cluster(connection: ClusterConnection) -> Self {
        Self::with_connection(Connection::Cluster(connection))
    }

    fn with_connection(connection: Connection) -> Self {
        Self {
            connection,
            keys: KeyNames::new(DEFAULT_PREFIX),
            scripts: std::sync::Arc::new(Scripts::new()),
            purge_batch: PURGE_BATCH,
            writers: std::sync::Arc::default(),
            loaders: std::sync::Arc::default(),
        }
    }

    /// The same store, purging `sessions` per script.
    #[cfg(test)]
    fn with_purge_batch(mut self, sessions: usize) -> Self {
        self.purge_batch = sessions;
        self
    }

    /// Connects to the Redis server at `url` (`redis://[user:password@]host[:port][/db]`).
    ///
    /// Fails with a backend error when the server cannot be reached within
    /// a few seconds. The connection reconnects by itself if the server goes
    /// away later; calls made while it is down fail with backend errors.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|err| Error::config(format_args!("invalid redis URL: {err}")))?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|err| Error::backend_source(STORE, "connect", err))?;
        Ok(Self::new(connection))
    }

    /// Connects to the Redis Cluster that `nodes` (URLs of some of its
    /// nodes) belong to.
    pub async fn connect_cluster<I, T>(nodes: I) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: redis::IntoConnectionInfo,
    {
        let client = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| Error::config(format_args!("invalid redis cluster nodes: {err}")))?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(|err| Error::backend_source(STORE, "connect to the cluster", err))?;
        Ok(Self::from_cluster(connection))
    }

    /// Puts every key of this store under `{prefix}:` instead of
    /// `{session2}:`, so several applications can share one Redis. A
    /// trailing `:` is dropped (`app:` and `app` name the same store).
    ///
    /// # Panics
    ///
    /// Panics if `prefix` is empty or contains `{` or `}` (the braces of the
    /// hash tag); [`RedisStore::try_with_prefix`] returns an error instead.
    #[must_use]
    pub fn with_prefix(self, prefix: impl AsRef<str>) -> Self {
        match self.try_with_prefix(prefix) {
            Ok(store) => store,
            Err(err) => panic!("{err}"),
        }
    }

    /// Like [`RedisStore::with_prefix`], with a config error for an invalid prefix.
    pub fn try_with_prefix(mut self, prefix: impl AsRef<str>) -> Result<Self> {
        let prefix = prefix.as_ref().trim_end_matches(':');
        check_prefix(prefix)?;
        self.keys = KeyNames::new(prefix);
        // The writers and loaders of the store it was cloned from use the old prefix.
        self.writers = std::sync::Arc::default();
        self.loaders = std::sync::Arc::default();
        Ok(self)
    }

    /// The prefix inside every key's hash tag.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// The Redis key holding the session `key`, for tools and tests.
    pub fn session_key_name(&self, key: &SessionKey) -> String {
        self.keys.session(key)
    }

    /// Runs `script` with the store's index keys and prefixes, then `args`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        context: &str,
        extra_key: Option<&[u8]>,
        args: &[&[u8]],
    ) -> Result<T> {
        let bytes = args.iter().map(|arg| arg.len()).sum();
        let mut call = self.script_call(script, extra_key, args.len(), bytes);
        for arg in args {
            call.arg(*arg);
        }
        self.call(script, &call, context).await
    }

    /// `EVALSHA` of `script` with the store's keys (and `extra_key`) and
    /// its prefixes as `ARGV[1]` and `ARGV[2]`; the caller appends the rest,
    /// about `more_args` arguments of `more_bytes` bytes in all.
    /// Arguments go straight into the command's one buffer, sized up front:
    /// a save costs a few allocations, not one per argument.
    fn script_call(
        &self,
        script: &Script,
        extra_key: Option<&[u8]>,
        more_args: usize,
        more_bytes: usize,
    ) -> Cmd {
        let keys = &self.keys;
        let extra = extra_key.unwrap_or_default();
        let fixed_bytes = "EVALSHA".len()
            + script.get_hash().len()
            + 1
            + keys.expiry.len()
            + keys.keys.len()
            + keys.owners.len()
            + extra.len()
            + keys.session_prefix.len()
            + keys.user_prefix.len();
        let mut call = Cmd::with_capacity(9 + more_args, fixed_bytes + more_bytes);
        call.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(3 + usize::from(extra_key.is_some()))
            .arg(&keys.expiry)
            .arg(&keys.keys)
            .arg(&keys.owners);
        if let Some(extra) = extra_key {
            call.arg(extra);
        }
        call.arg(&keys.session_prefix).arg(&keys.user_prefix);
        call
    }

    /// A call of `script` with the session `key`'s name as its one key, for
    /// a script that takes no other names: each key or argument costs a
    /// script about 1,500 instructions, and this spares the five of
    /// [`script_call`](Self::script_call). The caller appends `more_args`
    /// arguments of `more_bytes` bytes in all.
    fn session_script_call(
        &self,
        script: &Script,
        key: &SessionKey,
        more_args: usize,
        more_bytes: usize,
    ) -> Cmd {
        let fixed_bytes =
            "EVALSHA".len() + script.get_hash().len() + 1 + self.keys.session_length();
        let mut call = Cmd::with_capacity(4 + more_args, fixed_bytes + more_bytes);
        call.arg("EVALSHA").arg(script.get_hash()).arg(1);
        self.keys.push_session(&mut call, key);
        call
    }

    /// Sends a [`script_call`](Self::script_call); a server that does not
    /// know the script yet (new, restarted or flushed) gets it loaded, and
    /// the call is sent once more.
    async fn call<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        call: &Cmd,
        context: &str,
    ) -> Result<T> {
        let mut connection = self.connection.clone();
        let reply = match call.query_async(&mut connection).await {
            Err(err) if err.code() == Some("NOSCRIPT") => {
                script
                    .load_async(&mut connection)
                    .await
                    .map_err(|err| Error::backend_source(STORE, context, err))?;
                call.query_async(&mut connection).await
            }
            reply => reply,
        };
        reply.map_err(|err| Error::backend_source(STORE, context, err))
    }

    /// Reads a session that is not a string: one in the hash layout of
    /// earlier session2 builds (see [`RECORD_FIELDS`]), which its next
    /// write turns into a string, or a foreign value (a decode error).
    async fn load_hash(&self, key: &SessionKey) -> Result<Result<Option<Record>>> {
        let mut connection = self.connection.clone();
        let mut read = Cmd::with_capacity(2 + RECORD_FIELDS.len(), 160);
        read.arg("HMGET").arg(self.keys.session(key));
        for field in RECORD_FIELDS {
            read.arg(field);
        }
        match read.query_async(&mut connection).await {
            Ok(value) => Ok(decode_record(value)),
            Err(err) if err.code() == Some("WRONGTYPE") => Ok(Err(Error::decode(format_args!(
                "redis key of session {} holds neither a string nor a hash",
                key.fingerprint()
            )))),
            Err(err) => Err(Error::backend_source(STORE, "load session", err)),
        }
    }

    /// Marks an unreadable record so that the next purge deletes it.
    async fn quarantine(&self, key: &SessionKey) -> Result<()> {
        let hex = key.to_hex();
        self.run::<i64>(
            &self.scripts.quarantine,
            "mark an unreadable session for purge",
            None,
            &[hex.as_bytes()],
        )
        .await
        .map(drop)
    }

    /// The store a writer runs on: a clone without the queues, so that the
    /// writer ends once the last handle to the store is gone.
    fn writer(&self) -> Self {
        Self {
            writers: std::sync::Arc::default(),
            loaders: std::sync::Arc::default(),
            ..self.clone()
        }
    }

    /// The loader: reads the loads that queue with one `MGET` per batch, up
    /// to [`LOAD_BATCHES_IN_FLIGHT`] batches at once on the multiplexed
    /// connection, until every queue handle is gone.
    async fn load_batches(self, jobs: Queue<LoadJob>) {
        let read = |batch| self.load_together(batch);
        let batching = Batching {
            max_batches_out: LOAD_BATCHES_IN_FLIGHT,
            ..Batching::one_at_a_time(MAX_LOADS)
        }
        .alone_when_few();
        run_batches(jobs, batching, read).await;
    }

    /// Reads the stored strings of `batch` in one `MGET` and answers each
    /// job with its own (nil for a key that is missing or holds no string);
    /// when the read fails, each job gets the error.
    async fn load_together(&self, batch: Vec<LoadJob>) {
        let mut read = Cmd::with_capacity(
            1 + batch.len(),
            4 + batch.len() * self.keys.session_length(),
        );
        read.arg("MGET");
        for job in &batch {
            self.keys.push_session(&mut read, &job.key);
        }
        match read.query_async(&mut self.connection.clone()).await {
            Ok(Value::Array(values)) if values.len() == batch.len() => {
                for (job, value) in batch.into_iter().zip(values) {
                    // A caller that gave up no longer listens.
                    let _ = job.reply.send(Ok(Read::Batched(value)));
                }
            }
            Ok(_) => answer_all(
                batch.into_iter().map(|job| job.reply),
                Error::backend(STORE, "unexpected reply to a batch of session reads"),
            ),
            Err(err) => answer_all(
                batch.into_iter().map(|job| job.reply),
                Error::backend_source(STORE, "load sessions", err),
            ),
        }
    }

    /// What is stored under `key`, read together with the loads that
    /// queue meanwhile (or alone when none does).
    async fn load_batched(&self, key: &SessionKey) -> Result<Read> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let job = LoadJob { key: *key, reply };
        let start = |jobs| self.writer().load_batches(jobs);
        let alone = async |job: LoadJob| {
            let read = self.read_alone(&job.key).await;
            // A caller that gave up no longer listens.
            let _ = job.reply.send(Ok(Read::Alone(read)));
        };
        self.loaders.run(STORE, job, outcome, start, alone).await
    }

    /// `GET` of `key`'s session alone.
    async fn read_alone(&self, key: &SessionKey) -> redis::RedisResult<Value> {
        let mut read = Cmd::with_capacity(2, "GET".len() + self.keys.session_length());
        read.arg("GET");
        self.keys.push_session(&mut read, key);
        read.query_async(&mut self.connection.clone()).await
    }

    /// The writer: makes the queued saves in batches, up to
    /// [`SWAP_BATCHES_IN_FLIGHT`] at once on the multiplexed connection,
    /// until every queue handle is gone.
    async fn swap_batches(self, jobs: Queue<SwapJob>) {
        let save = |batch| self.swap_together(batch);
        let batching = Batching {
            max_batches_out: SWAP_BATCHES_IN_FLIGHT,
            ..Batching::one_at_a_time(MAX_SWAPS)
        }
        .alone_when_few();
        run_batches(jobs, batching, save).await;
    }

    /// Makes the saves of `batch` (one script for them all, or the one-save
    /// script for one) and answers each.
    async fn swap_together(&self, mut batch: Vec<SwapJob>) {
        if batch.len() == 1 {
            let job = batch.remove(0);
            let swapped = self.replace_alone(&job).await;
            let _ = job.reply.send(swapped);
            return;
        }
        match self.replace_many(&batch).await {
            Ok(swapped) => {
                for (job, swapped) in batch.into_iter().zip(swapped) {
                    // A caller that gave up no longer listens; its save stands.
                    let _ = job.reply.send(Ok(swapped));
                }
            }
            Err(err) => answer_all(batch.into_iter().map(|job| job.reply), err),
        }
    }

    /// Tries to take `lease` on `key` once, with the lease script.
    async fn lease_once(
        &self,
        key: &SessionKey,
        lease: Lease,
        now: Timestamp,
    ) -> Result<LeaseReply> {
        let script = &self.scripts.lease;
        let mut call = self.session_script_call(script, key, 3, 64);
        call.arg(now.as_millis())
            .arg(lease.token)
            .arg(lease.until.as_millis());
        let reply: Value = self.call(script, &call, "lock session").await?;
        let unexpected = || Error::backend(STORE, "unexpected reply from the lease script");
        let outcome = match reply {
            Value::Int(0) => LeaseOutcome::Missing,
            Value::Int(3) => return Ok(LeaseReply::Unreadable),
            // The outcome, then the session as the script read or wrote it.
            Value::BulkString(reply) => match reply.split_first() {
                Some((b'1', stored)) => LeaseOutcome::Held(decode_stored(stored)?),
                Some((b'2', stored)) => LeaseOutcome::Taken(decode_stored(stored)?),
                _ => return Err(unexpected()),
            },
            _ => return Err(unexpected()),
        };
        Ok(LeaseReply::Decided(outcome))
    }

    /// One save, with the one-save script.
    async fn replace_alone(&self, job: &SwapJob) -> Result<bool> {
        let expected = job.expected_version.to_string();
        self.write(
            &self.scripts.replace,
            "replace session",
            &job.key,
            &[millis_arg(job.now).as_bytes(), expected.as_bytes()],
            &job.record,
            job.now,
        )
        .await
    }

    /// The saves of `jobs` in one script, in order; whether each won.
    async fn replace_many(&self, jobs: &[SwapJob]) -> Result<Vec<bool>> {
        let script = &self.scripts.replace_many;
        // Per save: its key name, now and expected version (room: 64 bytes), then the record.
        let bytes = jobs
            .iter()
            .map(|job| 64 + self.keys.session_length() + record_size(&job.record))
            .sum();
        let mut call = self.script_call(script, None, jobs.len() * (3 + RECORD_ARGS), bytes);
        for job in jobs {
            self.keys.push_session(&mut call, &job.key);
            call.arg(job.now.as_millis()).arg(job.expected_version);
            push_record(&mut call, &job.record, job.now);
        }
        let swapped: Vec<u8> = self.call(script, &call, "replace sessions").await?;
        if swapped.len() != jobs.len() || swapped.iter().any(|&won| won != b'0' && won != b'1') {
            return Err(Error::backend(
                STORE,
                "unexpected reply from the batch save script",
            ));
        }
        Ok(swapped.into_iter().map(|won| won == b'1').collect())
    }

    async fn write(
        &self,
        script: &Script,
        context: &str,
        key: &SessionKey,
        head: &[&[u8]],
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let head_bytes: usize = head.iter().map(|arg| arg.len()).sum();
        let mut call = self.script_call(
            script,
            None,
            1 + head.len() + RECORD_ARGS,
            64 + head_bytes + record_size(record),
        );
        call.arg(&key.hex_bytes()[..]);
        for arg in head {
            call.arg(*arg);
        }
        push_record(&mut call, record, now);
        let written: i64 = self.call(script, &call, context).await?;
        Ok(written == 1)
    }
}

/// When Redis should drop the key of a session that expires at `expires_at`,
/// written at `now` (every write sets it, with `PXAT`): after its expiry by
/// its remaining lifetime, at most [`KEY_EXPIRY_SLACK`]. Reads and purge go
/// by the session's own expiry, so a key that outlives its session is dead
/// to them; the slack keeps a Redis server whose clock runs ahead of the
/// application's from dropping a session the application still counts
/// live, while dead sessions' keys still go by themselves when nobody purges.
fn key_expiry(expires_at: Timestamp, now: Timestamp) -> Timestamp {
    let expires = expires_at.as_millis();
    let cap = i64::try_from(KEY_EXPIRY_SLACK.as_millis()).unwrap_or(i64::MAX);
    let slack = expires.saturating_sub(now.as_millis()).clamp(0, cap);
    Timestamp::from_millis(expires.saturating_add(slack))
}

/// How many arguments [`push_record`] appends.
const RECORD_ARGS: usize = 4;

/// About how many bytes [`push_record`] appends for `record`.
fn record_size(record: &Record) -> usize {
    let user = record.user.as_deref().map_or(0, str::len);
    // Nine numbers and their separators come to under 200 bytes.
    200 + 2 * user + record.data.len()
}

/// Appends `record`, written at `now`, as the scripts' `create` and `swap`
/// take it ([`RECORD_ARGS`] arguments): its expiry, when Redis should drop
/// the key ([`key_expiry`]), its user (empty when it has none, else `+` and
/// the user), then the session's string ([`write_record`]). Each goes
/// straight into the command's buffer.
fn push_record(call: &mut Cmd, record: &Record, now: Timestamp) {
    let expires_at = record.expires_at();
    // `PXAT` takes positive times only; an earlier time drops the key at
    // once, as a time in the past does.
    call.arg(expires_at.as_millis())
        .arg(key_expiry(expires_at, now).as_millis().max(1));
    let mut user = call.writer_for_next_arg();
    if let Some(name) = &record.user {
        in_memory(
            user.write_all(b"+")
                .and_then(|()| user.write_all(name.as_bytes())),
        );
    }
    drop(user);
    write_record(&mut call.writer_for_next_arg(), record);
}

/// The outcome of writes to a buffer in memory, which cannot fail.
fn in_memory(written: io::Result<()>) {
    written.expect("writing to a buffer in memory cannot fail");
}

/// Writes the session's string (see [`decode_stored`]).
///
/// The numbers around the user are gathered on the stack and go to `out`
/// in two writes: a write into a command's argument costs more than
/// formatting the number, and a record has nine.
fn write_record(out: &mut impl io::Write, record: &Record) {
    let lease = record.lease;
    let mut numbers = Numbers::default();
    numbers.push(record.version);
    numbers.push(record.expires_at().as_millis());
    numbers.push_optional(record.user.as_ref().map(String::len));
    let mut write = || -> io::Result<()> {
        out.write_all(numbers.take())?;
        out.write_all(record.user.as_deref().unwrap_or_default().as_bytes())?;
        numbers.push_optional(record.absolute_deadline.map(Timestamp::as_millis));
        numbers.push_optional(lease.map(|lease| lease.token));
        numbers.push_optional(lease.map(|lease| lease.until.as_millis()));
        numbers.push(record.created_at.as_millis());
        numbers.push(record.accessed_at.as_millis());
        numbers.push(record.idle_deadline.as_millis());
        out.write_all(numbers.take())?;
        out.write_all(&record.data)
    };
    in_memory(write());
}

/// Up to six decimal numbers, each followed by `|`, for [`write_record`].
struct Numbers {
    bytes: [u8; Self::CAPACITY],
    len: usize,
}

impl Numbers {
    /// Six of the longest (`-9223372036854775808|`, `18446744073709551615|`).
    const CAPACITY: usize = 6 * 21;

    /// Appends `value` and its `|`.
    fn push(&mut self, value: impl itoa::Integer) {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(value).as_bytes();
        let end = self.len + digits.len();
        self.bytes[self.len..end].copy_from_slice(digits);
        self.bytes[end] = b'|';
        self.len = end + 1;
    }

    /// Appends `value` and its `|`, or the `|` alone for `None`.
    fn push_optional(&mut self, value: Option<impl itoa::Integer>) {
        match value {
            Some(value) => self.push(value),
            None => {
                self.bytes[self.len] = b'|';
                self.len += 1;
            }
        }
    }

    /// The numbers so far, leaving none.
    fn take(&mut self) -> &[u8] {
        let len = std::mem::take(&mut self.len);
        &self.bytes[..len]
    }
}

impl Default for Numbers {
    fn default() -> Self {
        Self {
            bytes: [0; Self::CAPACITY],
            len: 0,
        }
    }
}

/// Decodes a session's string as the scripts store it:
///
/// `version|expires_at|user length|<user>absolute_deadline|lease_token|lease_until|created_at|accessed_at|idle_deadline|<data>`
///
/// The user length is empty when there is no user, the absolute deadline
/// and the lease are empty when absent, and numbers are decimal (times in
/// Unix milliseconds). It accepts exactly what the scripts' patterns
/// accept, so that a session one side can read, the other can too.
///
/// One string, not a hash of fields: a `GET` costs Redis less than an
/// `HMGET` of ten fields, redis-rs parses one value instead of ten (about
/// 1,300 instructions each), and a save is one `SET` of the string built
/// by [`write_record`].
fn decode_stored(stored: &[u8]) -> Result<Record> {
    let (head, fields) = decode_head(stored)?;
    decode_rest(head, fields)
}

/// The record whose [`Head`] [`decode_head`] read, from the `fields` after it.
fn decode_rest(head: Head<'_>, mut fields: Fields<'_>) -> Result<Record> {
    let at = Timestamp::from_millis;
    let optional = |fields: &mut Fields| fields.signed().ok_or_else(garbled);
    let required = |fields: &mut Fields| optional(fields)?.map(at).ok_or_else(garbled);
    let absolute_deadline = optional(&mut fields)?.map(at);
    let lease_token: Option<u64> = fields.unsigned().ok_or_else(garbled)?;
    let lease = match (lease_token, optional(&mut fields)?) {
        (Some(token), Some(until)) => Some(Lease {
            token,
            until: at(until),
        }),
        (None, None) => None,
        _ => return Err(Error::decode("redis session has half a lease")),
    };
    Ok(Record {
        version: head.version,
        user: head.user.map(str::to_owned),
        created_at: required(&mut fields)?,
        accessed_at: required(&mut fields)?,
        idle_deadline: required(&mut fields)?,
        absolute_deadline,
        lease,
        data: fields.0.to_vec(),
    })
}

/// What the scripts' `parse` reads of a session's string, but its expiry
/// (the fields after the head hold the deadlines it comes from): its
/// version and user.
#[derive(Debug)]
struct Head<'a> {
    version: u64,
    user: Option<&'a str>,
}

/// Decodes the [`Head`] of a session's string (see [`decode_stored`]), and
/// gives the fields after it.
fn decode_head(stored: &[u8]) -> Result<(Head<'_>, Fields<'_>)> {
    let mut fields = Fields(stored);
    let version: u64 = fields.unsigned().flatten().ok_or_else(garbled)?;
    // The expiry, which the scripts read, must be there.
    fields.signed().flatten().ok_or_else(garbled)?;
    let user = match fields.unsigned::<usize>().ok_or_else(garbled)? {
        Some(length) => {
            let user = fields.take(length).ok_or_else(garbled)?;
            let user = std::str::from_utf8(user)
                .map_err(|_| Error::decode("redis session's user is not UTF-8"))?;
            Some(user)
        }
        None => None,
    };
    let head = Head { version, user };
    Ok((head, fields))
}

/// The error for a session's string that does not decode. It names the
/// shape only: the bytes may be session data.
fn garbled() -> Error {
    Error::decode("redis session is not a session2 record")
}

/// The unread rest of a session's string.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// The next `length` bytes.
    fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        let taken = self.0.get(..length)?;
        self.0 = &self.0[length..];
        Some(taken)
    }

    /// The next field up to its `|`.
    fn field(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&byte| byte == b'|')?;
        let field = self.take(end)?;
        self.0 = &self.0[1..];
        Some(field)
    }

    /// The next field as a decimal number the way the scripts' patterns
    /// take it (`%d*`): `Some(None)` when empty, `None` when it is anything
    /// else or out of `T`'s range.
    fn unsigned<T: TryFrom<u64>>(&mut self) -> Option<Option<T>> {
        match self.field()? {
            [] => Some(None),
            digits => T::try_from(decimal(digits)?).ok().map(Some),
        }
    }

    /// The next field as a decimal number with an optional `-` (`%-?%d*`),
    /// as [`unsigned`](Self::unsigned) reads it.
    fn signed(&mut self) -> Option<Option<i64>> {
        match self.field()? {
            [] => Some(None),
            [b'-', digits @ ..] => 0i64.checked_sub_unsigned(decimal(digits)?).map(Some),
            digits => i64::try_from(decimal(digits)?).ok().map(Some),
        }
    }
}

/// The value of at least one ASCII digit, digit by digit: `str::parse` cost
/// four times as much, on every load.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| {
        let digit = digit.is_ascii_digit().then(|| u64::from(digit - b'0'))?;
        value.checked_mul(10)?.checked_add(digit)
    })
}

/// The fields of a session in the hash layout of earlier session2 builds,
/// in the order [`RedisStore::load_hash`] reads them (the scripts'
/// `from_hash` reads the same fields). Such a session is read as it is and
/// written as a string (see [`decode_stored`]) by its next write.
const RECORD_FIELDS: [&str; 10] = [
    "version",
    "expires_at",
    "user",
    "created_at",
    "accessed_at",
    "idle_deadline",
    "absolute_deadline",
    "lease_token",
    "lease_until",
    "data",
];

/// Decodes the values of [`RECORD_FIELDS`], in that order, as `HMGET`
/// returns them; `None` when the hash has none of them (as a missing key reads).
fn decode_record(value: Value) -> Result<Option<Record>> {
    // The messages name the reply's shape only: its bytes may be session data.
    let items = match value {
        Value::Array(items) if items.len() == RECORD_FIELDS.len() => items,
        Value::Array(items) => {
            return Err(Error::decode(format_args!(
                "redis session read gave {} values, not {}",
                items.len(),
                RECORD_FIELDS.len()
            )));
        }
        _ => return Err(Error::decode("redis session is not a hash")),
    };
    let mut values: [Option<Vec<u8>>; RECORD_FIELDS.len()] = Default::default();
    for (slot, item) in values.iter_mut().zip(items) {
        *slot = match item {
            Value::Nil => None,
            Value::BulkString(bytes) => Some(bytes),
            _ => return Err(Error::decode("redis session hash holds a non-string item")),
        };
    }
    if values.iter().all(Option::is_none) {
        return Ok(None);
    }
    record_from_values(values).map(Some)
}

/// A record from the values of [`RECORD_FIELDS`], in order: owned as
/// `HMGET` gives them or borrowed from a packed record (only `data` is
/// copied then).
fn record_from_values<V>(values: [Option<V>; RECORD_FIELDS.len()]) -> Result<Record>
where
    V: AsRef<[u8]> + Into<Vec<u8>>,
{
    fn text<'v, V: AsRef<[u8]>>(value: &'v Option<V>, name: &str) -> Result<Option<&'v str>> {
        value
            .as_ref()
            .map(|bytes| {
                std::str::from_utf8(bytes.as_ref()).map_err(|_| {
                    Error::decode(format_args!("redis session field `{name}` is not UTF-8"))
                })
            })
            .transpose()
    }
    fn number<T: std::str::FromStr, V: AsRef<[u8]>>(
        value: &Option<V>,
        name: &str,
    ) -> Result<Option<T>> {
        text(value, name)?
            .map(|text| {
                text.parse().map_err(|_| {
                    Error::decode(format_args!(
                        "redis session field `{name}` is not a number: `{text}`"
                    ))
                })
            })
            .transpose()
    }
    fn required<T: std::str::FromStr, V: AsRef<[u8]>>(value: &Option<V>, name: &str) -> Result<T> {
        number(value, name)?
            .ok_or_else(|| Error::decode(format_args!("redis session has no `{name}` field")))
    }
    let [
        version,
        _expires_at,
        user,
        created_at,
        accessed_at,
        idle_deadline,
        absolute_deadline,
        lease_token,
        lease_until,
        data,
    ] = values;
    let at = Timestamp::from_millis;
    let lease = match (
        number::<u64, _>(&lease_token, "lease_token")?,
        number::<i64, _>(&lease_until, "lease_until")?,
    ) {
        (Some(token), Some(until)) => Some(Lease {
            token,
            until: at(until),
        }),
        (None, None) => None,
        _ => return Err(Error::decode("redis session has half a lease")),
    };
    Ok(Record {
        version: required(&version, "version")?,
        user: text(&user, "user")?.map(str::to_owned),
        created_at: at(required(&created_at, "created_at")?),
        accessed_at: at(required(&accessed_at, "accessed_at")?),
        idle_deadline: at(required(&idle_deadline, "idle_deadline")?),
        absolute_deadline: number::<i64, _>(&absolute_deadline, "absolute_deadline")?.map(at),
        lease,
        data: data
            .ok_or_else(|| Error::decode("redis session has no `data` field"))?
            .into(),
    })
}

/// Splits a script's `{hex, packed record}` pairs into keys and decoded
/// records; `None` for a record that cannot be decoded.
fn decode_entries(value: Value) -> Result<Vec<(SessionKey, Option<Record>)>> {
    let Value::Array(entries) = value else {
        return Err(Error::backend(STORE, "unexpected reply from a script"));
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut pair) = entry else {
            return Err(Error::backend(STORE, "unexpected entry from a script"));
        };
        let (Some(Value::BulkString(packed)), Some(Value::BulkString(hex))) =
            (pair.pop(), pair.pop())
        else {
            return Err(Error::backend(STORE, "unexpected entry from a script"));
        };
        let Some(key) = std::str::from_utf8(&hex)
            .ok()
            .and_then(SessionKey::from_hex)
        else {
            continue;
        };
        out.push((key, decode_stored(&packed).ok()));
    }
    Ok(out)
}

fn millis_arg(at: Timestamp) -> String {
    at.as_millis().to_string()
}

#[async_trait]
impl SessionStore for RedisStore {
    fn name(&self) -> &'static str {
        STORE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            is_multiprocess_safe: true,
            is_thread_safe: true,
        }
    }

    async fn setup(&self) -> Result<()> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| Error::backend_source(STORE, "reach the server", err))?;
        // Managed servers may rename `INFO` away: the version then goes unchecked.
        match redis::cmd("INFO")
            .arg("server")
            .query_async::<Value>(&mut connection)
            .await
        {
            Ok(info) => check_server_version(&info),
            Err(err) => {
                tracing::debug!(error = %err, "redis INFO failed; server version not checked");
                Ok(())
            }
        }
    }

    async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        let stored = match self.load_batched(key).await? {
            // Missing, or a hash of earlier builds, which `MGET` cannot read.
            Read::Batched(Value::Nil) => self.read_alone(key).await,
            Read::Batched(stored) => Ok(stored),
            Read::Alone(stored) => stored,
        };
        let decoded = match stored {
            Ok(Value::Nil) => return Ok(None),
            Ok(Value::BulkString(stored)) => decode_stored(&stored).map(Some),
            Ok(_) => Err(Error::decode("redis session read gave an unexpected reply")),
            Err(err) if err.code() == Some("WRONGTYPE") => self.load_hash(key).await?,
            Err(err) => return Err(Error::backend_source(STORE, "load session", err)),
        };
        match decoded {
            Ok(record) => Ok(record.filter(|record| !record.is_expired_at(now))),
            Err(err) => {
                self.quarantine(key).await?;
                Err(err)
            }
        }
    }

    async fn create(
        &self,
        key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<CreateOutcome> {
        let created = self
            .write(
                &self.scripts.create,
                "create session",
                key,
                &[millis_arg(now).as_bytes()],
                record,
                now,
            )
            .await?;
        Ok(if created {
            CreateOutcome::Created
        } else {
            CreateOutcome::Collision
        })
    }

    async fn replace(
        &self,
        key: &SessionKey,
        expected_version: u64,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let job = SwapJob {
            key: *key,
            expected_version,
            record: record.clone(),
            now,
            reply,
        };
        let start = |jobs| self.writer().swap_batches(jobs);
        let alone = async |job: SwapJob| {
            // A caller that gave up no longer listens; its save stands.
            let swapped = self.replace_alone(&job).await;
            let _ = job.reply.send(swapped);
        };
        self.writers.run(STORE, job, outcome, start, alone).await
    }

    async fn lease(&self, key: &SessionKey, lease: Lease, now: Timestamp) -> Result<LeaseOutcome> {
        // A session rewritten between the attempt and `load` is tried again, a few times.
        for _ in 0..3 {
            match self.lease_once(key, lease, now).await? {
                LeaseReply::Decided(outcome) => return Ok(outcome),
                LeaseReply::Unreadable => {
                    // `load` marks it for purge and reports the decode
                    // error; if it was rewritten meanwhile, try again.
                    self.load(key, now).await?;
                }
            }
        }
        Err(Error::decode(format_args!(
            "redis session {} reads, but a lease cannot read it",
            key.fingerprint()
        )))
    }

    async fn rename(
        &self,
        key: &SessionKey,
        expected_version: u64,
        new_key: &SessionKey,
        record: &Record,
        now: Timestamp,
    ) -> Result<bool> {
        let now_arg = millis_arg(now);
        let expected = expected_version.to_string();
        self.write(
            &self.scripts.rename,
            "renew session id",
            new_key,
            &[
                now_arg.as_bytes(),
                &key.hex_bytes()[..],
                expected.as_bytes(),
            ],
            record,
            now,
        )
        .await
    }

    async fn delete(&self, key: &SessionKey, expected_version: Option<u64>) -> Result<bool> {
        let hex = key.to_hex();
        let expected = expected_version.map(|v| v.to_string()).unwrap_or_default();
        let deleted: i64 = self
            .run(
                &self.scripts.delete,
                "delete session",
                None,
                &[hex.as_bytes(), expected.as_bytes()],
            )
            .await?;
        Ok(deleted == 1)
    }

    async fn touch(
        &self,
        key: &SessionKey,
        accessed_at: Timestamp,
        idle_deadline: Timestamp,
    ) -> Result<bool> {
        let hex = key.to_hex();
        // The session expires at `idle_deadline` or earlier.
        let key_expiry = millis_arg(key_expiry(idle_deadline, accessed_at));
        let accessed_at = millis_arg(accessed_at);
        let idle_deadline = millis_arg(idle_deadline);
        let touched: i64 = self
            .run(
                &self.scripts.touch,
                "touch session",
                None,
                &[
                    hex.as_bytes(),
                    accessed_at.as_bytes(),
                    idle_deadline.as_bytes(),
                    key_expiry.as_bytes(),
                ],
            )
            .await?;
        Ok(touched == 1)
    }

    async fn purge_expired(&self, now: Timestamp) -> Result<u64> {
        let now = millis_arg(now);
        let batch = self.purge_batch.to_string();
        let mut purged = 0;
        loop {
            let (deleted, examined): (u64, usize) = self
                .run(
                    &self.scripts.purge,
                    "purge expired sessions",
                    None,
                    &[now.as_bytes(), batch.as_bytes()],
                )
                .await?;
            purged += deleted;
            if examined < self.purge_batch {
                return Ok(purged);
            }
        }
    }

    async fn list(&self, after: Option<&SessionKey>, limit: usize) -> Result<Page> {
        if limit == 0 {
            return Ok(Page::default());
        }
        let limit = limit.min(MAX_PAGE);
        let start = after.map_or_else(|| "-".to_owned(), |key| format!("({}", key.to_hex()));
        let wanted = (limit + 1).to_string();
        let reply: Value = self
            .run(
                &self.scripts.list,
                "list sessions",
                None,
                &[start.as_bytes(), wanted.as_bytes()],
            )
            .await?;
        let mut entries = decode_entries(reply)?;
        let next = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|(key, _)| *key)
        } else {
            None
        };
        let records = entries
            .into_iter()
            .filter_map(|(key, record)| record.map(|record| (key, record)))
            .collect();
        Ok(Page { records, next })
    }

    async fn count(&self) -> Result<u64> {
        self.run(&self.scripts.count, "count sessions", None, &[])
            .await
    }

    async fn find_by_user(&self, user: &str, now: Timestamp) -> Result<Vec<(SessionKey, Record)>> {
        let user_key = self.keys.user(user);
        let reply: Value = self
            .run(
                &self.scripts.find_by_user,
                "find sessions by user",
                Some(&user_key),
                &[],
            )
            .await?;
        let mut found: Vec<(SessionKey, Record)> = decode_entries(reply)?
            .into_iter()
            .filter_map(|(key, record)| record.map(|record| (key, record)))
            .filter(|(_, record)| {
                record.user.as_deref() == Some(user) && !record.is_expired_at(now)
            })
            .collect();
        found.sort_by_key(|(key, _)| *key);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `version` with `data`, written at `now`, live for ten minutes.
    fn record_at(now: Timestamp, version: u64, data: &[u8]) -> Record {
        Record {
            version,
            data: data.to_vec(),
            ..Record::new(now, now.saturating_add(Duration::from_secs(600)), None)
        }
    }

    /// A store on the test server under a fresh prefix; `None` when the
    /// server is unreachable outside CI (see `require_server`).
    /// The test server: `SESSION2_TEST_REDIS_URL`, else the local one.
    fn test_url() -> String {
        std::env::var("SESSION2_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    async fn test_store() -> Option<RedisStore> {
        let connected = RedisStore::connect(&test_url()).await;
        let store = crate::testing::require_server("redis", connected)?;
        let prefix = format!(
            "s2unit-{}",
            crate::SessionId::generate().key().fingerprint()
        );
        Some(store.with_prefix(prefix))
    }

    #[test]
    fn setup_refuses_a_server_older_than_6_2_by_its_info() {
        let info = |version: &str| {
            Value::BulkString(
                format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n")
                    .into_bytes(),
            )
        };
        for fit in ["7.0.15", "6.2.0", "10.0.1"] {
            assert!(check_server_version(&info(fit)).is_ok(), "{fit}");
        }
        for old in ["6.0.16", "5.0.7", "4.0.9"] {
            let err = check_server_version(&info(old)).unwrap_err();
            assert!(err.is_config(), "{old}: {err}");
            let text = err.to_string();
            assert!(text.contains("6.2") && text.contains(old), "{text}");
        }
        // Valkey reports the Redis version it matches beside its own.
        let valkey = Value::BulkString(
            b"# Server\r\nredis_version:7.2.4\r\nvalkey_version:8.0.1\r\n".to_vec(),
        );
        assert!(check_server_version(&valkey).is_ok());
        // A cluster answers per node: the oldest node decides.
        let cluster = Value::Map(vec![
            (Value::SimpleString("a:6379".into()), info("7.0.15")),
            (Value::SimpleString("b:6379".into()), info("6.0.16")),
        ]);
        assert!(check_server_version(&cluster).unwrap_err().is_config());
        // A server that keeps its version to itself is not refused.
        for unknown in [
            Value::Nil,
            info("unstable"),
            Value::BulkString(b"# Server\r\n".to_vec()),
        ] {
            assert!(check_server_version(&unknown).is_ok(), "{unknown:?}");
        }
    }

    #[test]
    fn setup_accepts_the_test_server() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            store.setup().await.unwrap();
        });
    }

    #[test]
    fn purges_in_small_batches() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let store = store.with_purge_batch(3);
            crate::store::test_support::purge_in_small_batches(store).await;
        });
    }

    #[test]
    fn a_store_given_another_prefix_saves_and_loads_under_it_even_after_its_original_did() {
        crate::testing::run(async {
            let Some(first) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let record = |version, data: &[u8]| record_at(now, version, data);
            let key = crate::SessionId::generate().key();
            // A save and a load through the first store start its writer and loader.
            first.create(&key, &record(1, b"first"), now).await.unwrap();
            assert!(
                first
                    .replace(&key, 1, &record(2, b"first, saved"), now)
                    .await
                    .unwrap()
            );
            assert!(first.load(&key, now).await.unwrap().is_some());
            let prefix = format!("{}-other", first.prefix());
            let other = first.clone().with_prefix(&prefix);
            other.create(&key, &record(1, b"other"), now).await.unwrap();
            assert!(
                other
                    .replace(&key, 1, &record(2, b"other, saved"), now)
                    .await
                    .unwrap()
            );
            let data =
                async |store: &RedisStore| store.load(&key, now).await.unwrap().unwrap().data;
            assert_eq!(data(&other).await, b"other, saved");
            assert_eq!(
                data(&first).await,
                b"first, saved",
                "each prefix keeps its own"
            );
        });
    }

    #[test]
    fn a_batch_read_answers_each_load_with_its_own_value() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let [live, missing, hash, garbled] =
                [(); 4].map(|()| crate::SessionId::generate().key());
            let record = record_at(now, 1, b"live");
            store.create(&live, &record, now).await.unwrap();
            write_as_hash(&store, &hash, &record).await;
            let _: () = redis::cmd("SET")
                .arg(store.session_key_name(&garbled))
                .arg("not a session")
                .query_async(&mut store.connection.clone())
                .await
                .unwrap();
            let (jobs, outcomes): (Vec<_>, Vec<_>) = [live, missing, hash, garbled, live]
                .into_iter()
                .map(|key| {
                    let (reply, outcome) = tokio::sync::oneshot::channel();
                    (LoadJob { key, reply }, outcome)
                })
                .unzip();
            store.load_together(jobs).await;
            let mut values = Vec::new();
            for outcome in outcomes {
                values.push(match outcome.await.unwrap().unwrap() {
                    Read::Batched(value) => value,
                    read @ Read::Alone(_) => panic!("not read in the batch: {read:?}"),
                });
            }
            let mut written = Vec::new();
            write_record(&mut written, &record);
            let bulk = |bytes: &[u8]| Value::BulkString(bytes.to_vec());
            assert_eq!(
                values,
                [
                    bulk(&written),
                    Value::Nil,
                    Value::Nil,
                    bulk(b"not a session"),
                    bulk(&written)
                ]
            );
        });
    }

    /// The commands Redis runs while `run` runs, from every client (tests
    /// run in parallel: filter by key), as `MONITOR` shows them, up to a
    /// `GET` of `marker` sent afterwards.
    async fn commands_during(
        store: &RedisStore,
        marker: &str,
        run: impl Future<Output = ()>,
    ) -> Vec<String> {
        use futures_util::StreamExt as _;
        let client = redis::Client::open(test_url()).unwrap();
        let monitor = client.get_async_monitor().await.unwrap();
        let mut lines = monitor.into_on_message::<String>();
        run.await;
        let _: Option<String> = redis::cmd("GET")
            .arg(marker)
            .query_async(&mut store.connection.clone())
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some(line) = lines.next().await {
            if line.contains(marker) {
                return seen;
            }
            seen.push(line);
        }
        panic!("the monitor ended before the marker: {seen:?}")
    }

    #[test]
    fn a_missing_session_read_alone_costs_one_get() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let missing = crate::SessionId::generate().key();
            // After its first batch the loader finds few loads under way,
            // and lets the next ones run alone.
            for _ in 0..3 {
                assert_eq!(store.load(&missing, now).await.unwrap(), None);
            }
            let name = store.session_key_name(&missing);
            let marker = format!("{name}-marker");
            let commands = commands_during(&store, &marker, async {
                assert_eq!(store.load(&missing, now).await.unwrap(), None);
            })
            .await;
            let reads: Vec<_> = commands
                .iter()
                .filter(|line| line.contains(&name))
                .collect();
            assert_eq!(reads.len(), 1, "{reads:?}");
            assert!(reads[0].contains("\"GET\""), "{reads:?}");
        });
    }

    /// The names of `commands` (as `commands_naming` gives them).
    fn names(commands: &[String]) -> Vec<&str> {
        commands
            .iter()
            .map(|command| command.split(' ').next().unwrap_or_default())
            .collect()
    }

    /// The commands of `commands` that name `hex`, without the script's
    /// own call: each as its name, then its arguments after the key.
    fn commands_naming(commands: &[String], hex: &str) -> Vec<String> {
        commands
            .iter()
            .filter(|line| line.contains(hex) && !line.contains("\"EVAL"))
            .map(|line| {
                let words: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
                let name = words.first().copied().unwrap_or_default();
                std::iter::once(name)
                    .chain(words.iter().skip(2).copied())
                    .filter(|word| !word.contains(hex))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn a_create_login_and_logout_read_only_the_session_they_change() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let (old, new) = (
                crate::SessionId::generate().key(),
                crate::SessionId::generate().key(),
            );
            let record = record_at(now, 1, b"{}");
            let marker = format!("{}-marker", store.session_key_name(&old));
            let commands = commands_during(&store, &marker, async {
                let created = store.create(&old, &record, now).await.unwrap();
                assert_eq!(created, crate::store::CreateOutcome::Created);
            })
            .await;
            let create = commands_naming(&commands, &old.to_hex());
            assert_eq!(names(&create), ["SET", "ZADD", "ZADD"], "{create:?}");
            assert!(create[0].ends_with(" NX"), "{create:?}");

            let mut signed_in = record_at(now, 2, b"{}");
            signed_in.user = Some("a-user".into());
            let commands = commands_during(&store, &marker, async {
                assert!(store.rename(&old, 1, &new, &signed_in, now).await.unwrap());
            })
            .await;
            // The old session: read, deleted, out of both indexes (it had
            // no user, which its record says: no owner lookup).
            let old_side = commands_naming(&commands, &old.to_hex());
            assert_eq!(
                names(&old_side),
                ["GET", "DEL", "ZREM", "ZREM"],
                "{old_side:?}"
            );
            // The new one: written only if free, in both indexes and its user's.
            let new_side = commands_naming(&commands, &new.to_hex());
            assert_eq!(
                names(&new_side),
                ["SET", "ZADD", "ZADD", "HSET", "SADD"],
                "{new_side:?}"
            );
            assert!(new_side[0].ends_with(" NX"), "{new_side:?}");
            assert_eq!(store.load(&new, now).await.unwrap(), Some(signed_in));
            assert_eq!(store.load(&old, now).await.unwrap(), None);

            // A logout: the user comes from the record too.
            let commands = commands_during(&store, &marker, async {
                assert!(store.delete(&new, None).await.unwrap());
            })
            .await;
            let logout = commands_naming(&commands, &new.to_hex());
            assert_eq!(
                names(&logout),
                ["GET", "DEL", "SREM", "HDEL", "ZREM", "ZREM"],
                "{logout:?}"
            );
        });
    }

    #[test]
    fn concurrent_loads_each_get_their_own_session() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let keys: Vec<_> = (0..64)
                .map(|_| crate::SessionId::generate().key())
                .collect();
            let stored = |i: usize| i % 4 != 3;
            for (i, key) in keys.iter().enumerate() {
                let record = record_at(now, 1, i.to_string().as_bytes());
                match i % 8 {
                    5 => write_as_hash(&store, key, &record).await,
                    _ if stored(i) => store.create(key, &record, now).await.map(drop).unwrap(),
                    _ => {}
                }
            }
            let loads = futures_util::future::join_all(keys.iter().map(|key| store.load(key, now)));
            for (i, loaded) in loads.await.into_iter().enumerate() {
                let data = loaded.unwrap().map(|record| record.data);
                let expected = stored(i).then(|| i.to_string().into_bytes());
                assert_eq!(data, expected, "session {i}");
            }
        });
    }

    #[test]
    fn a_batch_saves_in_order_each_as_it_would_alone() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let record = |version, data: &[u8]| record_at(now, version, data);
            let [a, b, missing] = [(); 3].map(|()| crate::SessionId::generate().key());
            for key in [a, b] {
                store
                    .create(&key, &record(1, b"created"), now)
                    .await
                    .unwrap();
            }
            let mut jobs = Vec::new();
            for (key, expected_version, data) in [
                (a, 1, b"a2".as_slice()),
                // The second save of `a` sees the first one's write.
                (a, 2, b"a3"),
                (a, 2, b"stale"),
                (b, 7, b"stale"),
                (missing, 1, b"missing"),
                (b, 1, b"b2"),
            ] {
                let (reply, _) = tokio::sync::oneshot::channel();
                jobs.push(SwapJob {
                    key,
                    expected_version,
                    record: record(expected_version + 1, data),
                    now,
                    reply,
                });
            }
            let swapped = store.replace_many(&jobs).await.unwrap();
            assert_eq!(swapped, [true, true, false, false, false, true]);
            let data = async |key| {
                store
                    .load(&key, now)
                    .await
                    .unwrap()
                    .map(|record| record.data)
            };
            assert_eq!(data(a).await.unwrap(), b"a3");
            assert_eq!(data(b).await.unwrap(), b"b2");
            assert_eq!(data(missing).await, None);
            // Each save wrote its own record only, not the arguments of the next.
            assert_eq!(stored(&store, &a).await, Some(record(3, b"a3")));
            store.delete(&a, None).await.unwrap();
            store.delete(&b, None).await.unwrap();
        });
    }

    #[test]
    fn a_batch_judges_each_save_at_its_own_now() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let created = crate::Clock::now(&crate::SystemClock);
            // Each session expires 600 s after `created` (see `record_at`).
            let expired = created.saturating_add(Duration::from_secs(600));
            let live = created.saturating_add(Duration::from_secs(1));
            let keys: [SessionKey; 4] = sessions(&store, created).await;
            let mut jobs = Vec::new();
            for (key, now) in keys.into_iter().zip([live, expired, expired, live]) {
                let (reply, _) = tokio::sync::oneshot::channel();
                jobs.push(SwapJob {
                    key,
                    expected_version: 1,
                    record: record_at(now, 2, b"saved"),
                    now,
                    reply,
                });
            }
            let swapped = store.replace_many(&jobs).await.unwrap();
            assert_eq!(swapped, [true, false, false, true]);
            for key in keys {
                store.delete(&key, None).await.unwrap();
            }
        });
    }

    #[test]
    fn prefixes_must_fit_in_a_hash_tag() {
        assert!(check_prefix("session2").is_ok());
        assert!(check_prefix("app:v2").is_ok());
        assert!(check_prefix("session2:").is_ok());
        for bad in ["", ":", "{x", "x}", "a{b}c"] {
            assert!(check_prefix(bad).unwrap_err().is_config(), "{bad}");
        }
    }

    #[test]
    fn every_key_shares_one_hash_tag() {
        let names = KeyNames::new("app");
        let key = SessionKey::from_bytes([7; 32]);
        for name in [
            names.session(&key),
            names.expiry.clone(),
            names.keys.clone(),
            names.owners.clone(),
            String::from_utf8(names.user("bob")).unwrap(),
        ] {
            assert!(name.starts_with("{app}:"), "{name}");
        }
    }

    /// The session under `key` as its raw string decodes; `None` when missing.
    async fn stored(store: &RedisStore, key: &SessionKey) -> Option<Record> {
        let mut connection = store.connection.clone();
        let stored: Option<Vec<u8>> = redis::cmd("GET")
            .arg(store.session_key_name(key))
            .query_async(&mut connection)
            .await
            .unwrap();
        stored.map(|stored| decode_stored(&stored).unwrap())
    }

    /// Records with each optional field absent and present, bytes that look
    /// like the format's separators in the user and the data, and data of
    /// many sizes.
    fn every_shape(now: Timestamp) -> Vec<Record> {
        let later = |seconds| now.saturating_add(Duration::from_secs(seconds));
        let plain = Record::new(now, later(60), None);
        let absolute_deadline = Some(later(30));
        let lease = Some(Lease {
            token: u64::MAX,
            until: later(5),
        });
        let mut shapes = vec![plain.clone()];
        for user in ["alice", "", "a|b|7|", "\u{e9}\u{2603}"] {
            shapes.push(Record {
                user: Some(user.to_owned()),
                ..plain.clone()
            });
        }
        shapes.push(Record {
            absolute_deadline,
            ..plain.clone()
        });
        shapes.push(Record {
            lease,
            ..plain.clone()
        });
        shapes.push(Record {
            version: u64::MAX,
            user: Some("bob".into()),
            absolute_deadline,
            lease,
            data: b"|12|x|\xff\x00".to_vec(),
            ..plain.clone()
        });
        for size in [1, 255, 65_536, 300_000] {
            shapes.push(Record {
                data: (0..size).map(|byte| (byte % 251) as u8).collect(),
                ..plain.clone()
            });
        }
        shapes
    }

    /// A record whose every number is at its longest in decimal: long
    /// expired, so for encoding tests only.
    fn longest_numbers() -> Record {
        let earliest = Timestamp::from_millis(i64::MIN);
        Record {
            version: u64::MAX,
            user: Some("u".repeat(1_000)),
            created_at: earliest,
            accessed_at: earliest,
            idle_deadline: earliest,
            absolute_deadline: Some(earliest),
            lease: Some(Lease {
                token: u64::MAX,
                until: earliest,
            }),
            data: crate::record::EMPTY_DATA.to_vec(),
        }
    }

    #[test]
    fn a_record_goes_in_four_arguments_and_reads_back() {
        let now = Timestamp::from_millis(1_000_000);
        let args = |record: &Record| {
            let mut call = Cmd::new();
            push_record(&mut call, record, now);
            call.args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => bytes.to_vec(),
                    _ => unreachable!("a record is plain arguments"),
                })
                .collect::<Vec<_>>()
        };
        for record in every_shape(now).into_iter().chain([longest_numbers()]) {
            let args = args(&record);
            let text = |number: i64| number.to_string().into_bytes();
            let expires_at = record.expires_at();
            assert_eq!(args.len(), RECORD_ARGS);
            assert_eq!(args[0], text(expires_at.as_millis()));
            assert_eq!(
                args[1],
                text(key_expiry(expires_at, now).as_millis().max(1))
            );
            let user = record.user.as_ref().map(|user| format!("+{user}"));
            assert_eq!(args[2], user.unwrap_or_default().into_bytes());
            assert!(args.iter().map(Vec::len).sum::<usize>() <= record_size(&record));
            assert_eq!(decode_stored(&args[3]).unwrap(), record);
        }
        // Redis takes positive times only; an earlier one drops the key at once.
        let at = Timestamp::from_millis;
        let long_gone = Record::new(at(-10_000), at(-5_000), None);
        assert_eq!(args(&long_gone)[1], b"1");
    }

    #[test]
    fn what_the_scripts_store_reads_back_as_written() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let later = |seconds| now.saturating_add(Duration::from_secs(seconds));
            for record in every_shape(now) {
                let key = crate::SessionId::generate().key();
                let created = store.create(&key, &record, now).await.unwrap();
                assert_eq!(created, CreateOutcome::Created);
                assert_eq!(stored(&store, &key).await.as_ref(), Some(&record));
                assert_eq!(store.load(&key, now).await.unwrap().as_ref(), Some(&record));
                // A lease rewrites the version and the lease, and nothing else.
                let lease = Lease {
                    token: 9,
                    until: later(1),
                };
                let leased = match store.lease(&key, lease, now).await.unwrap() {
                    LeaseOutcome::Taken(taken) => {
                        let expected = Record {
                            version: record.version + 1,
                            lease: Some(lease),
                            ..record.clone()
                        };
                        assert_eq!(taken, expected);
                        taken
                    }
                    LeaseOutcome::Held(held) => {
                        assert!(record.lease.is_some(), "{record:?}");
                        assert_eq!(held, record);
                        held
                    }
                    LeaseOutcome::Missing => panic!("{record:?} is missing"),
                };
                assert_eq!(stored(&store, &key).await.as_ref(), Some(&leased));
                // A touch rewrites the access time and the idle deadline.
                assert!(store.touch(&key, later(2), later(120)).await.unwrap());
                let touched = Record {
                    accessed_at: later(2),
                    idle_deadline: later(120),
                    ..leased
                };
                assert_eq!(stored(&store, &key).await, Some(touched));
                assert!(store.delete(&key, None).await.unwrap());
            }
        });
    }

    /// A number field as `str::parse` reads it, after the checks of the
    /// scripts' patterns: what [`Fields::unsigned`] and [`Fields::signed`]
    /// must agree with.
    fn parsed<T: std::str::FromStr>(field: &[u8], signed: bool) -> Option<Option<T>> {
        let digits = match field {
            [] => return Some(None),
            [b'-', digits @ ..] if signed => digits,
            digits => digits,
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(field).ok()?.parse().ok().map(Some)
    }

    #[test]
    fn number_fields_read_as_str_parse_reads_them() {
        let fields: [&[u8]; 22] = [
            b"",
            b"0",
            b"007",
            b"1795743502991",
            b"18446744073709551615",
            b"18446744073709551616",
            b"99999999999999999999999",
            b"9223372036854775807",
            b"9223372036854775808",
            b"-9223372036854775808",
            b"-9223372036854775809",
            b"-0",
            b"-",
            b"--5",
            b"+5",
            b" 5",
            b"5 ",
            b"5a",
            b"0x10",
            b"1e3",
            "\u{663}".as_bytes(),
            b"\xff",
        ];
        for field in fields {
            let with_bar = [field, b"|rest".as_slice()].concat();
            let unsigned = Fields(&with_bar).unsigned::<u64>();
            assert_eq!(unsigned, parsed::<u64>(field, false), "{field:?}");
            let unsigned = Fields(&with_bar).unsigned::<usize>();
            assert_eq!(unsigned, parsed::<usize>(field, false), "{field:?}");
            let signed = Fields(&with_bar).signed();
            assert_eq!(signed, parsed::<i64>(field, true), "{field:?}");
            // A field with no `|` after it is cut short.
            assert_eq!(Fields(field).signed(), None, "{field:?}");
        }
    }

    #[test]
    fn garbled_stored_records_are_decode_errors() {
        let good: &[u8] = b"7|5000|5|alice3000|9|2000|1000|1500|5000|data|with|bars";
        let record = decode_stored(good).unwrap();
        let at = Timestamp::from_millis;
        let expected = Record {
            version: 7,
            user: Some("alice".into()),
            created_at: at(1000),
            accessed_at: at(1500),
            idle_deadline: at(5000),
            absolute_deadline: Some(at(3000)),
            lease: Some(Lease {
                token: 9,
                until: at(2000),
            }),
            data: b"data|with|bars".to_vec(),
        };
        assert_eq!(record, expected);
        // version, expires_at, user length, absolute_deadline, lease_token,
        // lease_until, created_at, accessed_at, idle_deadline
        let fields = ["7", "5000", "", "", "", "", "1000", "1500", "5000"];
        let join = |fields: &[&str]| format!("{}|data", fields.join("|")).into_bytes();
        assert!(decode_stored(&join(&fields)).is_ok());
        let changed = |changes: &[(usize, &'static str)]| {
            let mut fields = fields;
            for &(at, value) in changes {
                fields[at] = value;
            }
            join(&fields)
        };
        let mut garbled = vec![
            Vec::new(),
            b"|".to_vec(),
            b"7|5000|".to_vec(),
            join(&fields[..8]),
            changed(&[(2, "99"), (3, "ab")]),
            b"7|5000|1|\xff|||1000|1500|5000|data".to_vec(),
            changed(&[(4, "5")]),
            changed(&[(5, "5")]),
            changed(&[(4, "-9"), (5, "5")]),
            changed(&[(4, "18446744073709551616"), (5, "5")]),
        ];
        for (at, value) in [
            (0, "+7"),
            (0, "-7"),
            (0, ""),
            (0, "x"),
            (1, ""),
            (1, "5e3"),
            (2, "-1"),
            (2, "1 "),
            (3, "3000.0"),
            (6, ""),
            (7, ""),
            (8, ""),
            (8, "99999999999999999999"),
        ] {
            garbled.push(changed(&[(at, value)]));
        }
        for stored in garbled {
            let err = decode_stored(&stored).unwrap_err();
            assert!(err.is_decode(), "{stored:?}: {err}");
        }
    }

    #[test]
    fn garbled_sessions_fail_each_read_and_go_at_the_next_purge() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let mut connection = store.connection.clone();
            // A head the scripts cannot read, a tail only the client checks.
            let head = format!("x|{}|||||1|1|1|data", now.as_millis() + 60_000);
            let tail = format!("7|{}|||||x|1|1|data", now.as_millis() + 60_000);
            for garbled in [head, tail] {
                let key = crate::SessionId::generate().key();
                let _: () = redis::cmd("SET")
                    .arg(store.session_key_name(&key))
                    .arg(&garbled)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                assert!(store.load(&key, now).await.unwrap_err().is_decode());
                let lease = Lease {
                    token: 1,
                    until: now,
                };
                let err = store.lease(&key, lease, now).await.unwrap_err();
                assert!(err.is_decode(), "{garbled}: {err}");
                let listed = store.list(None, 10).await.unwrap();
                assert!(listed.records.is_empty(), "{garbled}");
            }
            let far = now.saturating_add(Duration::from_secs(7200));
            assert_eq!(store.purge_expired(far).await.unwrap(), 2);
            assert_eq!(store.count().await.unwrap(), 0);
        });
    }

    #[test]
    fn the_scripts_know_the_slack() {
        let millis = KEY_EXPIRY_SLACK.as_millis();
        let constant = format!("local KEY_EXPIRY_SLACK_MS = {millis}\n");
        assert!(include_str!("redis_write.lua").contains(&constant));
    }

    #[test]
    fn keys_outlive_their_sessions_by_at_most_the_slack() {
        let at = Timestamp::from_millis;
        let hour = i64::try_from(KEY_EXPIRY_SLACK.as_millis()).unwrap();
        assert_eq!(key_expiry(at(10_000), at(4_000)), at(16_000));
        assert_eq!(key_expiry(at(10 * hour), at(0)), at(11 * hour));
        // Already expired, or saturating: never before the session's expiry.
        assert_eq!(key_expiry(at(1_000), at(4_000)), at(1_000));
        assert_eq!(key_expiry(at(i64::MAX), at(0)), at(i64::MAX));
    }

    #[test]
    fn decode_errors_do_not_quote_the_reply() {
        let secret = Value::BulkString(b"secret-token".to_vec());
        for value in [Value::Array(vec![secret.clone()]), secret] {
            let message = decode_record(value).unwrap_err().to_string();
            assert!(!message.contains("secret"), "{message}");
        }
        for stored in [b"7|secret-token".as_slice(), b"7|1|5|secret|1|1|1|"] {
            let message = decode_stored(stored).unwrap_err().to_string();
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn a_hash_without_record_fields_reads_as_missing() {
        let nothing = vec![Value::Nil; RECORD_FIELDS.len()];
        assert_eq!(decode_record(Value::Array(nothing)).unwrap(), None);
    }

    /// Writes `record` under `key` as earlier session2 builds did: a hash
    /// of named fields expiring with the session, and its index entries.
    async fn write_as_hash(store: &RedisStore, key: &SessionKey, record: &Record) {
        let hex = key.to_hex();
        let session = store.session_key_name(key);
        let expires_at = record.expires_at().as_millis();
        let mut hash = redis::cmd("HSET");
        hash.arg(&session)
            .arg("version")
            .arg(record.version)
            .arg("created_at")
            .arg(record.created_at.as_millis())
            .arg("accessed_at")
            .arg(record.accessed_at.as_millis())
            .arg("idle_deadline")
            .arg(record.idle_deadline.as_millis())
            .arg("expires_at")
            .arg(expires_at)
            .arg("indexed_expiry")
            .arg(expires_at)
            .arg("ttl_at")
            .arg(expires_at)
            .arg("data")
            .arg(&record.data);
        if let Some(user) = &record.user {
            hash.arg("user").arg(user);
        }
        if let Some(absolute) = record.absolute_deadline {
            hash.arg("absolute_deadline").arg(absolute.as_millis());
        }
        if let Some(lease) = record.lease {
            hash.arg("lease_token")
                .arg(lease.token)
                .arg("lease_until")
                .arg(lease.until.as_millis());
        }
        let mut write = redis::pipe();
        write
            .add_command(hash)
            .cmd("PEXPIREAT")
            .arg(&session)
            .arg(expires_at)
            .cmd("ZADD")
            .arg(&store.keys.expiry)
            .arg(expires_at)
            .arg(&hex)
            .cmd("ZADD")
            .arg(&store.keys.keys)
            .arg(0)
            .arg(&hex);
        if let Some(user) = &record.user {
            write
                .cmd("HSET")
                .arg(&store.keys.owners)
                .arg(&hex)
                .arg(user)
                .cmd("SADD")
                .arg(store.keys.user(user))
                .arg(&hex);
        }
        let mut connection = store.connection.clone();
        write.query_async::<()>(&mut connection).await.unwrap();
    }

    #[test]
    fn a_failed_save_leaves_what_was_there() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let mut connection = store.connection.clone();
            // The raw value under `key` and how long its key has to live.
            let raw = async |key: &SessionKey| {
                let name = store.session_key_name(key);
                let mut connection = store.connection.clone();
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&name)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                let ttl: i64 = redis::cmd("PTTL")
                    .arg(&name)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                (value, ttl)
            };
            let record = record_at(now, 3, b"kept");
            // Its key would live hours longer than the old one's.
            let newer = Record {
                idle_deadline: now.saturating_add(Duration::from_secs(7200)),
                ..record_at(now, 4, b"lost")
            };

            // A stale version: the session stays, its key expiring as before.
            let key = crate::SessionId::generate().key();
            store.create(&key, &record, now).await.unwrap();
            let (value, ttl) = raw(&key).await;
            assert!(!store.replace(&key, 2, &newer, now).await.unwrap());
            let (after, ttl_after) = raw(&key).await;
            assert_eq!(after, value);
            assert!(
                (ttl - ttl_after).abs() < 5_000,
                "{ttl} ms, then {ttl_after} ms"
            );
            // An expired session is not replaced either.
            let later = now.saturating_add(Duration::from_secs(660));
            assert!(!store.replace(&key, 3, &newer, later).await.unwrap());
            assert_eq!(raw(&key).await.0, value);
            assert_eq!(store.load(&key, now).await.unwrap(), Some(record.clone()));

            // A missing session is not created.
            let missing = crate::SessionId::generate().key();
            assert!(!store.replace(&missing, 3, &newer, now).await.unwrap());
            assert_eq!(raw(&missing).await, (None, -2));

            // Bytes that are not a session stay, expiring as they did.
            let foreign = crate::SessionId::generate().key();
            let _: () = redis::cmd("SET")
                .arg(store.session_key_name(&foreign))
                .arg(b"not a session".as_slice())
                .arg("PX")
                .arg(600_000)
                .query_async(&mut connection)
                .await
                .unwrap();
            assert!(!store.replace(&foreign, 3, &newer, now).await.unwrap());
            let (value, ttl) = raw(&foreign).await;
            assert_eq!(value.as_deref(), Some(b"not a session".as_slice()));
            assert!(ttl > 0, "{ttl}");

            // A hash of earlier builds at another version is not written.
            let hash = crate::SessionId::generate().key();
            write_as_hash(&store, &hash, &record).await;
            assert!(!store.replace(&hash, 2, &newer, now).await.unwrap());
            let kind: String = redis::cmd("TYPE")
                .arg(store.session_key_name(&hash))
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(kind, "hash");
            assert_eq!(store.load(&hash, now).await.unwrap(), Some(record));
        });
    }

    #[test]
    fn hash_sessions_of_earlier_builds_read_and_become_strings() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let later = |seconds| now.saturating_add(Duration::from_secs(seconds));
            let full = Record {
                version: 4,
                user: Some("carol|7|".into()),
                absolute_deadline: Some(later(600)),
                lease: Some(Lease {
                    token: 3,
                    until: now,
                }),
                data: b"\x00|1|\xff".to_vec(),
                // Every time differs from the others.
                accessed_at: now,
                ..Record::new(
                    Timestamp::from_millis(now.as_millis() - 10_000),
                    later(60),
                    None,
                )
            };
            let plain = Record::new(now, later(60), None);
            let mut connection = store.connection.clone();
            for record in [full, plain] {
                let hash_session = async || {
                    let key = crate::SessionId::generate().key();
                    write_as_hash(&store, &key, &record).await;
                    key
                };
                let is_string = async |key: &SessionKey| {
                    let kind: String = redis::cmd("TYPE")
                        .arg(store.session_key_name(key))
                        .query_async(&mut store.connection.clone())
                        .await
                        .unwrap();
                    kind == "string"
                };

                // Read as they are, by every reader.
                let key = hash_session().await;
                assert_eq!(store.load(&key, now).await.unwrap().as_ref(), Some(&record));
                let listed = store.list(None, 10).await.unwrap().records;
                assert_eq!(listed, [(key, record.clone())]);
                if let Some(user) = &record.user {
                    let found = store.find_by_user(user, now).await.unwrap();
                    assert_eq!(found, [(key, record.clone())]);
                }
                assert!(!is_string(&key).await);

                // Each write makes a string of it.
                let saved = Record {
                    version: record.version + 1,
                    data: b"saved".to_vec(),
                    ..record.clone()
                };
                assert!(
                    store
                        .replace(&key, record.version, &saved, now)
                        .await
                        .unwrap()
                );
                assert!(is_string(&key).await);
                assert_eq!(store.load(&key, now).await.unwrap(), Some(saved));
                assert!(store.delete(&key, None).await.unwrap());

                let key = hash_session().await;
                let lease = Lease {
                    token: 8,
                    until: later(1),
                };
                let leased = Record {
                    version: record.version + 1,
                    lease: Some(lease),
                    ..record.clone()
                };
                let taken = store.lease(&key, lease, now).await.unwrap();
                assert_eq!(taken, LeaseOutcome::Taken(leased.clone()));
                assert!(is_string(&key).await);
                assert_eq!(store.load(&key, now).await.unwrap(), Some(leased));
                assert!(store.delete(&key, None).await.unwrap());

                let key = hash_session().await;
                assert!(store.touch(&key, later(1), later(90)).await.unwrap());
                assert!(is_string(&key).await);
                let touched = Record {
                    accessed_at: later(1),
                    idle_deadline: later(90),
                    ..record.clone()
                };
                assert_eq!(store.load(&key, now).await.unwrap(), Some(touched));
                assert!(store.delete(&key, Some(record.version)).await.unwrap());

                // A delete checks the version of the hash.
                let key = hash_session().await;
                let stale = record.version + 1;
                assert!(!store.delete(&key, Some(stale)).await.unwrap());
                assert!(store.delete(&key, Some(record.version)).await.unwrap());

                // A purge moves a live one whose index entry ran early, and
                // deletes an expired one with its index entries.
                let key = hash_session().await;
                let _: () = redis::cmd("ZADD")
                    .arg(&store.keys.expiry)
                    .arg(now.as_millis())
                    .arg(key.to_hex())
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                assert_eq!(store.purge_expired(later(1)).await.unwrap(), 0);
                assert_eq!(store.load(&key, now).await.unwrap().as_ref(), Some(&record));
                assert_eq!(store.purge_expired(later(7200)).await.unwrap(), 1);
                assert_eq!(store.count().await.unwrap(), 0);
                // An expired one is replaced by a create.
                let key = hash_session().await;
                let fresh = record_at(later(7200), 1, b"fresh");
                let created = store.create(&key, &fresh, later(7200)).await;
                assert_eq!(created.unwrap(), CreateOutcome::Created);
                assert!(is_string(&key).await);
                assert!(store.delete(&key, None).await.unwrap());
            }
            assert_eq!(store.count().await.unwrap(), 0);
        });
    }

    #[test]
    fn missing_or_garbled_fields_are_decode_errors() {
        let bulk = |text: &[u8]| Value::BulkString(text.to_vec());
        let values = |version: Value, data: Value| {
            let mut items = vec![Value::Nil; RECORD_FIELDS.len()];
            let mut set = |name: &str, value: Value| {
                let index = RECORD_FIELDS.iter().position(|field| *field == name);
                items[index.expect("a record field")] = value;
            };
            set("version", version);
            set("created_at", bulk(b"1"));
            set("accessed_at", bulk(b"1"));
            set("idle_deadline", bulk(b"1"));
            set("data", data);
            Value::Array(items)
        };
        assert!(decode_record(values(bulk(b"1"), bulk(b""))).is_ok());
        for value in [
            values(Value::Nil, bulk(b"")),
            values(bulk(b"x"), bulk(b"")),
            values(bulk(b"1"), Value::Nil),
            values(bulk(b"1"), Value::Int(3)),
            Value::Array(vec![bulk(b"version"), bulk(b"1")]),
            Value::Array(Vec::new()),
            Value::Int(3),
        ] {
            assert!(decode_record(value).unwrap_err().is_decode());
        }
    }

    async fn set_raw(store: &RedisStore, key: &SessionKey, value: &[u8]) {
        let mut connection = store.connection.clone();
        let _: () = redis::cmd("SET")
            .arg(store.session_key_name(key))
            .arg(value)
            .arg("PX")
            .arg(600_000)
            .query_async(&mut connection)
            .await
            .unwrap();
    }

    /// Each of `sessions` as `store` holds it, with its key's type, as text
    /// to compare with another prefix's.
    async fn held(store: &RedisStore, sessions: &[SessionKey]) -> Vec<String> {
        let mut connection = store.connection.clone();
        let mut held = Vec::new();
        for key in sessions {
            let name = store.session_key_name(key);
            let kind: String = redis::cmd("TYPE")
                .arg(&name)
                .query_async(&mut connection)
                .await
                .unwrap();
            let value: Option<Vec<u8>> = if kind == "string" {
                redis::cmd("GET")
                    .arg(&name)
                    .query_async(&mut connection)
                    .await
                    .unwrap()
            } else {
                None
            };
            let value = value.map(|value| String::from_utf8_lossy(&value).into_owned());
            held.push(format!("{kind} {value:?}"));
        }
        held
    }

    #[test]
    fn the_lease_script_decides_each_kind_of_session() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let after_expiry = now.saturating_add(Duration::from_secs(700));
            let [live, expired, missing, hash, foreign, leased, garbled] =
                [(); 7].map(|()| crate::SessionId::generate().key());
            let sessions = [live, expired, missing, hash, foreign, leased, garbled];
            let record = |version, data: &[u8]| record_at(now, version, data);
            store.create(&live, &record(1, b"live"), now).await.unwrap();
            let expires = record(1, b"expires");
            store.create(&expired, &expires, now).await.unwrap();
            write_as_hash(&store, &hash, &record(1, b"hash")).await;
            set_raw(&store, &foreign, b"not a session").await;
            let held_lease = Lease {
                token: 7,
                until: now.saturating_add(Duration::from_secs(60)),
            };
            let held_record = record(1, b"leased").with_lease(held_lease);
            store.create(&leased, &held_record, now).await.unwrap();
            // A head the script reads, and a tail it cannot.
            set_raw(&store, &garbled, b"1|99999999999999|||x|y|z|").await;
            let cases = [
                (live, 1, now, "Decided(Taken("),
                (live, 2, now, "Decided(Held("),
                (expired, 3, now, "Decided(Taken("),
                // The lease above binds, but the session has expired since.
                (expired, 10, after_expiry, "Decided(Missing)"),
                (missing, 4, now, "Decided(Missing)"),
                (hash, 5, now, "Decided(Taken("),
                (hash, 6, now, "Decided(Held("),
                (foreign, 7, now, "Unreadable"),
                (leased, 8, now, "Decided(Held("),
                (garbled, 9, now, "Unreadable"),
            ];
            for (key, token, at, expected) in cases {
                let lease = Lease {
                    token,
                    until: at.saturating_add(Duration::from_secs(30)),
                };
                let outcome = format!("{:?}", store.lease_once(&key, lease, at).await.unwrap());
                assert!(
                    outcome.starts_with(expected),
                    "lease {token}: {outcome} is not {expected}…"
                );
            }
            let held = held(&store, &sessions).await;
            assert!(held[2].starts_with("none"), "no session was made: {held:?}");
            assert!(
                held[3].starts_with("string"),
                "the hash became a string: {held:?}"
            );
        });
    }

    /// The lease script adds one to the version in decimal, digit by
    /// digit: a last digit below nine alone, a run of nines carried.
    #[test]
    fn a_lease_adds_one_to_the_version_past_every_carry() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let versions = [1, 8, 9, 10, 99, 199, 1_299, 9_999, u64::MAX - 1];
            for (token, version) in (1..).zip(versions) {
                let key = crate::SessionId::generate().key();
                let created = record_at(now, version, b"versioned");
                store.create(&key, &created, now).await.unwrap();
                let lease = Lease {
                    token,
                    until: now.saturating_add(Duration::from_secs(30)),
                };
                let outcome = store.lease(&key, lease, now).await.unwrap();
                let leased = Record {
                    version: version + 1,
                    lease: Some(lease),
                    ..created
                };
                assert_eq!(outcome, LeaseOutcome::Taken(leased.clone()), "{version}");
                assert_eq!(store.load(&key, now).await.unwrap(), Some(leased));
            }
        });
    }

    /// `N` sessions made at `now`, at version 1 with the data `created`.
    async fn sessions<const N: usize>(store: &RedisStore, now: Timestamp) -> [SessionKey; N] {
        let keys = [(); N].map(|()| crate::SessionId::generate().key());
        for key in &keys {
            let created = record_at(now, 1, b"created");
            store.create(key, &created, now).await.unwrap();
        }
        keys
    }
}
