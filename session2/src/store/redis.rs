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
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Script, Value};

use crate::store::writer::{SwapJob, Writers, answer, answer_all};
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
/// How long at most a session's key outlives the session in Redis: see
/// [`key_expiry`].
const KEY_EXPIRY_SLACK: Duration = Duration::from_secs(3600);

/// A script: the prelude, the parts it uses (`["redis_index.lua",
/// "redis_write.lua"]`, each in the order it needs them), then its body.
macro_rules! script {
    ([$($part:literal),*], $body:literal) => {
        concat!(include_str!("redis_prelude.lua"), $(include_str!($part),)* $body)
    };
    ($body:literal) => {
        script!([], $body)
    };
}

/// ARGV[3] = hex, ARGV[4] = now, ARGV[5..] = the record to write.
const CREATE: &str = script!(
    ["redis_index.lua", "redis_write.lua"],
    r"
local hex = ARGV[3]
local cur, expires = current(sprefix .. hex)
if cur and expires > tonumber(ARGV[4]) then return 0 end
if cur ~= nil then remove(hex) end
write(hex, 5, nil, #ARGV)
return 1
"
);

/// ARGV[3] = hex, ARGV[4] = now, ARGV[5] = expected version, ARGV[6..] = the record.
const REPLACE: &str = script!(
    ["redis_write.lua"],
    r"
local hex = ARGV[3]
local cur, expires = current(sprefix .. hex)
if not cur or expires <= tonumber(ARGV[4]) or cur[VERSION] ~= ARGV[5] then return 0 end
write(hex, 6, cur, #ARGV)
return 1
"
);

/// ARGV[3..]: for each save, the count n of its arguments that follow,
/// then hex, now, expected version and the record (n - 3 arguments).
/// Returns one string of `1` or `0` per save, in order: each is the
/// `REPLACE` above, run after the ones before it (a later save of the same
/// session sees the earlier one's write). One string, not an array: redis-rs
/// parses each element of an array reply on its own.
const REPLACE_MANY: &str = script!(
    ["redis_write.lua"],
    r"
local swapped, i = {}, 3
while i <= #ARGV do
  local last = i + tonumber(ARGV[i])
  local hex = ARGV[i + 1]
  local cur, expires = current(sprefix .. hex)
  if not cur or expires <= tonumber(ARGV[i + 2]) or cur[VERSION] ~= ARGV[i + 3] then
    swapped[#swapped + 1] = '0'
  else
    write(hex, i + 4, cur, last)
    swapped[#swapped + 1] = '1'
  end
  i = last + 1
end
return table.concat(swapped)
"
);

/// ARGV[3] = hex, ARGV[4] = now, ARGV[5] = lease token, ARGV[6] = lease until.
/// Returns 0 when missing, 3 when unreadable (the caller's `load` reports
/// it), else one string: the outcome, 1 when another lease binds or 2 when
/// taken, then the record from the script's one read, both in MessagePack
/// (see [`unpack_record`]).
const LEASE: &str = script!(
    r"
local hex = ARGV[3]
local skey = sprefix .. hex
local now = tonumber(ARGV[4])
local record, expires_at = read_record(skey)
if record == false then return 3 end
if not record or expires_at <= now then return 0 end
local lease_until = tonumber(record[9])
if lease_until and lease_until > now then return cmsgpack.pack(1, record) end
-- The version is a decimal u64: add one digit by digit, beyond Lua's exact doubles.
local digits, i = record[1], #record[1]
while i > 0 and string.sub(digits, i, i) == '9' do i = i - 1 end
local version = i == 0 and '1' .. string.rep('0', #digits)
  or string.sub(digits, 1, i - 1) .. string.char(string.byte(digits, i) + 1) .. string.rep('0', #digits - i)
redis.call('HSET', skey, 'version', version, 'lease_token', ARGV[5], 'lease_until', ARGV[6])
record[1], record[8], record[9] = version, ARGV[5], ARGV[6]
return cmsgpack.pack(2, record)
"
);

/// ARGV[3] = hex, ARGV[4] = expected version or '' for any.
const DELETE: &str = script!(
    ["redis_index.lua"],
    r"
local hex = ARGV[3]
local cur = current(sprefix .. hex)
if cur == nil then
  unindex(hex)
  return 0
end
if ARGV[4] ~= '' and (not cur or cur[VERSION] ~= ARGV[4]) then return 0 end
remove(hex)
return 1
"
);

/// ARGV[3] = hex, ARGV[4] = accessed_at, ARGV[5] = idle_deadline,
/// ARGV[6] = when Redis should drop the key if it must be moved, chosen from
/// the idle deadline (see `key_expiry`).
const TOUCH: &str = script!(
    ["redis_write.lua"],
    r"
local hex = ARGV[3]
local skey = sprefix .. hex
local cur, current_expiry = current(skey)
if not cur or current_expiry <= tonumber(ARGV[4]) then return 0 end
local expires_at, expires = ARGV[5], tonumber(ARGV[5])
local absolute = tonumber(cur[ABSOLUTE])
if absolute and absolute < expires then expires_at, expires = cur[ABSOLUTE], absolute end
local ttl_at, expire = key_expiry(expires_at, expires, cur[TTL_AT], ARGV[6])
redis.call('HSET', skey, 'accessed_at', ARGV[4], 'idle_deadline', ARGV[5], 'expires_at', expires_at,
  'indexed_expiry', index_expiry(hex, expires_at, expires, cur[INDEXED]), 'ttl_at', ttl_at)
if expire then redis.call('PEXPIREAT', skey, ttl_at) end
return 1
"
);

/// ARGV[3] = now, ARGV[4] = batch size. Returns {deleted, examined}.
/// One `HGET` of the expiry per due session: a record that cannot be read
/// has none (quarantine clears it), and the owner index names the users.
/// The deletes and index removals of the whole batch go in a few
/// multi-key commands.
const PURGE: &str = script!(
    r"
local now = tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', exp, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
local gone, names = {}, {}
for _, hex in ipairs(due) do
  local skey = sprefix .. hex
  -- A string, false when missing, an error table when not a hash.
  local expires_at = redis.pcall('HGET', skey, 'expires_at')
  local expires = type(expires_at) == 'string' and tonumber(expires_at)
  if expires and expires > now then
    -- Its entry ran early (see `index_expiry`): move it to the real expiry.
    redis.call('ZADD', exp, expires_at, hex)
    redis.call('HSET', skey, 'indexed_expiry', expires_at)
  else
    table.insert(gone, hex)
    table.insert(names, skey)
  end
end
if #gone == 0 then return { 0, #due } end
local deleted = redis.call('DEL', unpack(names))
-- The entries of `gone` are the first of the index now: the moved ones
-- went past `now`, behind every entry not yet looked at.
redis.call('ZREMRANGEBYRANK', exp, 0, #gone - 1)
redis.call('ZREM', keys, unpack(gone))
local users = redis.call('HMGET', owners, unpack(gone))
local owned, by_user = {}, {}
for i = 1, #gone do
  local user = users[i]
  if user then
    table.insert(owned, gone[i])
    by_user[user] = by_user[user] or {}
    table.insert(by_user[user], gone[i])
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
local server_now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, hex in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', server_now)) do
  if redis.call('EXISTS', sprefix .. hex) == 0 then unindex(hex) end
end
return redis.call('ZCARD', keys)
"
);

/// ARGV[3] = first bound for ZRANGEBYLEX, ARGV[4] = entries wanted.
/// Returns {hex, record} pairs in key order, skipping vanished sessions;
/// each record in MessagePack (see [`unpack_record`]).
const LIST: &str = script!(
    ["redis_index.lua"],
    r"
local out = {}
local start = ARGV[3]
local want = tonumber(ARGV[4])
while #out < want do
  local batch = redis.call('ZRANGEBYLEX', keys, start, '+', 'LIMIT', 0, want - #out)
  if #batch == 0 then break end
  for _, hex in ipairs(batch) do
    local fields = fetch(hex)
    if fields then table.insert(out, { hex, cmsgpack.pack(fields) }) end
  end
  start = '(' .. batch[#batch]
end
return out
"
);

/// KEYS[4] = the user's set. Returns {hex, record} pairs of its sessions;
/// each record in MessagePack (see [`unpack_record`]).
const FIND_BY_USER: &str = script!(
    ["redis_index.lua"],
    r"
local out = {}
for _, hex in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local fields = fetch(hex)
  if fields then
    table.insert(out, { hex, cmsgpack.pack(fields) })
  else
    redis.call('SREM', KEYS[4], hex)
  end
end
return out
"
);

/// ARGV[3] = hex. Puts an unreadable record in the indexes, due at once,
/// and clears the expiry of a hash, so that the next purge deletes it.
const QUARANTINE: &str = script!(
    r"
local hex = ARGV[3]
local skey = sprefix .. hex
if current(skey) ~= false then return 0 end
redis.pcall('HSET', skey, 'expires_at', '')
redis.call('ZADD', exp, '-inf', hex)
redis.call('ZADD', keys, 0, hex)
return 1
"
);

/// The scripts, hashed once per store.
struct Scripts {
    create: Script,
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
/// | as Redis is configured (RDB/AOF) | yes | yes | yes: `PEXPIREAT` per session, plus purge | yes: one Lua script |
///
/// Use it when several workers or machines serve one application and Redis
/// (5 or later, or Valkey) is already at hand. Build it from the application's own
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
/// | `{session2}:s:<hex key>` | hash | one session: its metadata fields and its `data` blob (binary), with `PEXPIREAT` at or after its expiry (the hash's `ttl_at` field keeps it) |
/// | `{session2}:exp` | sorted set | every session, scored by its expiry in Unix milliseconds or earlier (the hash's `indexed_expiry` field keeps the score) |
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
/// A session is a hash, not one encoded value, so that
/// [`touch`](SessionStore::touch) rewrites two small fields in a script
/// without reading or re-encoding the data blob (decoding JSON in Lua with
/// `cjson` would also round large numbers in the application's data).
///
/// # Expiry
///
/// Redis deletes a session's key by itself soon after the session expires,
/// so dead sessions' data never piles up even when nobody purges: the key's
/// `PEXPIREAT` lies past the session's expiry by its remaining lifetime at
/// the write, at most an hour, and a save moves it only when the session's
/// expiry passes it or falls more than an hour before it. A key may thus
/// outlive its session by up to an hour in Redis (reads and purge go by the
/// session's own expiry, so it is dead to them), never end before it. Every decision about expiry in the
/// scripts uses the `now` the caller passes, never the server's clock;
/// [`purge_expired`](SessionStore::purge_expired) walks the expiry index up
/// to `now` and deletes exactly those sessions and their index entries.
/// A save that only moves a session's expiry later leaves its index entry
/// where it was, and purge moves the entry when it meets the session still
/// alive: one index write per session and idle period instead of one per
/// request, so a save is two commands (read the metadata, write the hash)
/// unless the user changes, the expiry moves back or the key's `PEXPIREAT`
/// is due to move.
/// Index entries left behind by sessions Redis expired by itself are dropped
/// when reads ([`list`](SessionStore::list), [`count`](SessionStore::count),
/// [`find_by_user`](SessionStore::find_by_user)) or purges meet them, so run
/// purge regularly to keep the indexes small.
/// Listing pages through the key index (never `KEYS` or `SCAN`);
/// [`count`](SessionStore::count) is exact: `ZCARD` of the key index after
/// dropping the entries whose session Redis already expired.
///
/// Concurrent saves are batched: a writer task (per runtime) sends the
/// saves that queued while its last script ran as one script, which makes
/// each compare-and-swap in order, as its own script would (a later save of
/// the same session sees the earlier one's write). The script's fixed cost,
/// several times that of a `SET`, is then paid once per batch. If the batch
/// script fails (the server goes away), every save of it gets the error; a
/// script that fails midway keeps the saves before the failure, as Redis
/// keeps a script's writes, so a caller told of an error may find its save
/// made, as after a reply lost on the network.
///
/// [`load`](SessionStore::load) is one `HMGET` of the record's fields. A
/// session whose hash cannot be decoded (or a foreign value under its
/// key) fails it with a decode error and is put in the expiry index as
/// already due, so the next purge deletes it; a hash with none of the
/// record's fields reads as no session.
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    keys: KeyNames,
    scripts: std::sync::Arc<Scripts>,
    /// The writers that batch saves, shared by the clones.
    writers: std::sync::Arc<Writers<SwapJob>>,
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

    fn user(&self, user: &str) -> Vec<u8> {
        let mut name = self.user_prefix.as_bytes().to_vec();
        name.extend_from_slice(user.as_bytes());
        name
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
        // The writers of the store it was cloned from write under the old prefix.
        self.writers = std::sync::Arc::default();
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
            ..self.clone()
        }
    }

    /// The writer: makes the queued saves in batches until every queue handle is gone.
    async fn swap_batches(self, mut jobs: tokio::sync::mpsc::Receiver<SwapJob>) {
        let mut batch = Vec::with_capacity(MAX_SWAPS);
        while jobs.recv_many(&mut batch, MAX_SWAPS).await > 0 {
            if batch.len() == 1 {
                let job = batch.remove(0);
                let swapped = self.replace_alone(&job).await;
                let _ = job.reply.send(swapped);
                continue;
            }
            match self.replace_many(&batch).await {
                Ok(swapped) => {
                    for (job, swapped) in batch.drain(..).zip(swapped) {
                        // A caller that gave up no longer listens; its save stands.
                        let _ = job.reply.send(Ok(swapped));
                    }
                }
                Err(err) => answer_all(batch.drain(..).map(|job| job.reply), err),
            }
        }
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
        // Per save: its count, hex key, now and expected version, then the record.
        let (args, bytes) = jobs.iter().fold((0, 0), |(args, bytes), job| {
            let (record_args, record_bytes) = record_size(&job.record);
            (args + 4 + record_args, bytes + 128 + record_bytes)
        });
        let mut call = self.script_call(script, None, args, bytes);
        for job in jobs {
            call.arg(3 + record_arg_count(&job.record))
                .arg(&job.key.hex_bytes()[..])
                .arg(job.now.as_millis())
                .arg(job.expected_version);
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
        let (record_args, record_bytes) = record_size(record);
        let mut call = self.script_call(
            script,
            None,
            1 + head.len() + record_args,
            64 + head_bytes + record_bytes,
        );
        call.arg(key.to_hex());
        for arg in head {
            call.arg(*arg);
        }
        push_record(&mut call, record, now);
        let written: i64 = self.call(script, &call, context).await?;
        Ok(written == 1)
    }
}

/// When Redis should drop the key of a session that expires at `expires_at`,
/// written at `now`: after its expiry by its remaining lifetime, at most
/// [`KEY_EXPIRY_SLACK`]. The scripts move a key's `PEXPIREAT` only when the
/// session's expiry passes it or falls more than the slack before it, so a
/// session saved on every request costs one `PEXPIREAT` per such stretch
/// instead of one per save, and its key outlives it in Redis by at most the
/// slack when nobody purges.
fn key_expiry(expires_at: Timestamp, now: Timestamp) -> Timestamp {
    let expires = expires_at.as_millis();
    let cap = i64::try_from(KEY_EXPIRY_SLACK.as_millis()).unwrap_or(i64::MAX);
    let slack = expires.saturating_sub(now.as_millis()).clamp(0, cap);
    Timestamp::from_millis(expires.saturating_add(slack))
}

/// How many arguments [`push_record`] appends for `record`: the flags, the
/// key's expiry, the fixed values, then a name and a value per optional field.
fn record_arg_count(record: &Record) -> usize {
    let optional = usize::from(record.user.is_some())
        + usize::from(record.absolute_deadline.is_some())
        + 2 * usize::from(record.lease.is_some());
    2 + WRITTEN_FIELDS.len() + 2 * optional
}

/// How many arguments, and about how many bytes, [`push_record`] appends
/// for `record`.
fn record_size(record: &Record) -> (usize, usize) {
    let user = record.user.as_deref().map_or(0, str::len);
    // Names and numbers come to under 200 bytes.
    (record_arg_count(record), 200 + user + record.data.len())
}

/// The fields every record has, in the order [`push_record`] passes their
/// values: the scripts' `write` names them itself, in the same order.
const WRITTEN_FIELDS: [&str; 6] = [
    "version",
    "created_at",
    "accessed_at",
    "idle_deadline",
    "expires_at",
    "data",
];

/// Appends a record, written at `now`, as the scripts' `write` reads it:
/// which optional fields it has (`1` or `0` for the user, the absolute
/// deadline and the lease), when Redis should drop the key
/// ([`key_expiry`]), the values of [`WRITTEN_FIELDS`], then the optional
/// fields as name/value pairs, the user first. Names go only with the
/// optional fields: every argument of a script costs Redis about 0.1 µs.
fn push_record(call: &mut Cmd, record: &Record, now: Timestamp) {
    let expires_at = record.expires_at();
    let has = [
        record.user.is_some(),
        record.absolute_deadline.is_some(),
        record.lease.is_some(),
    ]
    .map(|present| if present { b'1' } else { b'0' });
    call.arg(&has[..])
        .arg(key_expiry(expires_at, now).as_millis())
        .arg(record.version)
        .arg(record.created_at.as_millis())
        .arg(record.accessed_at.as_millis())
        .arg(record.idle_deadline.as_millis())
        .arg(expires_at.as_millis())
        .arg(record.data.as_slice());
    if let Some(user) = &record.user {
        call.arg("user").arg(user.as_str());
    }
    if let Some(absolute) = record.absolute_deadline {
        call.arg("absolute_deadline").arg(absolute.as_millis());
    }
    if let Some(lease) = record.lease {
        call.arg("lease_token")
            .arg(lease.token)
            .arg("lease_until")
            .arg(lease.until.as_millis());
    }
}

/// The hash fields a record is read from, in the order every read asks for
/// them: `HMGET` in [`RedisStore::load`], and `read_meta` then
/// `read_record` in the scripts' prelude. A reply of values alone parses in
/// about half the time of `HGETALL`'s name/value pairs, and costs Redis the
/// same. `expires_at` is derived from the deadlines; the scripts read it first.
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

/// Decodes a record a script returned as Redis's `cmsgpack.pack` encodes
/// the fields `read_record` gives: a MessagePack array of the values of
/// [`RECORD_FIELDS`], in order, each a string or `false` when absent.
///
/// One string instead of a nested array reply: redis-rs parses each element
/// of a reply on its own, at about 1,300 instructions each, and `cmsgpack`
/// (C) costs Redis no more than building the nested reply. Measured on the
/// benchmark's exclusive read-modify-write over Redis: 84,000 instructions
/// a request in the server before, 65,500 after. The decoder reads only the
/// shapes that encoder writes for these values, so it is a few lines rather
/// than a MessagePack dependency.
fn unpack_record(mut packed: &[u8]) -> Result<Record> {
    // The messages name the shape only: the bytes may be session data.
    let garbled = || Error::decode("redis script gave a garbled session record");
    let mut take = |len: usize| -> Result<&[u8]> {
        if packed.len() < len {
            return Err(garbled());
        }
        let (head, rest) = packed.split_at(len);
        packed = rest;
        Ok(head)
    };
    // A fixarray of exactly as many values as fields.
    if take(1)? != [0x90 | RECORD_FIELDS.len() as u8] {
        return Err(garbled());
    }
    let mut values: [Option<&[u8]>; RECORD_FIELDS.len()] = Default::default();
    for slot in &mut values {
        let marker = take(1)?[0];
        let len = match marker {
            0xc0 | 0xc2 => continue, // nil, false
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xd9 => usize::from(take(1)?[0]),
            0xda => usize::from(u16::from_be_bytes(
                take(2)?.try_into().map_err(|_| garbled())?,
            )),
            0xdb => {
                let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| garbled())?);
                usize::try_from(len).map_err(|_| garbled())?
            }
            _ => return Err(garbled()),
        };
        *slot = Some(take(len)?);
    }
    if !packed.is_empty() {
        return Err(garbled());
    }
    record_from_values(values)
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
        out.push((key, unpack_record(&packed).ok()));
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
            .map_err(|err| Error::backend_source(STORE, "reach the server", err))
    }

    async fn load(&self, key: &SessionKey, now: Timestamp) -> Result<Option<Record>> {
        let mut connection = self.connection.clone();
        let session = self.keys.session(key);
        let field_bytes: usize = RECORD_FIELDS.iter().map(|field| field.len()).sum();
        // Sized up front: growing the buffers argument by argument cost about
        // 1 µs a load, nearly as much as parsing the reply.
        let mut read = Cmd::with_capacity(
            2 + RECORD_FIELDS.len(),
            "HMGET".len() + session.len() + field_bytes,
        );
        read.arg("HMGET").arg(session);
        for field in RECORD_FIELDS {
            read.arg(field);
        }
        let reply: RedisResult<Value> = read.query_async(&mut connection).await;
        let value = match reply {
            Ok(value) => value,
            Err(err) if err.code() == Some("WRONGTYPE") => {
                self.quarantine(key).await?;
                return Err(Error::decode(format_args!(
                    "redis key of session {} is not a hash",
                    key.fingerprint()
                )));
            }
            Err(err) => return Err(Error::backend_source(STORE, "load session", err)),
        };
        match decode_record(value) {
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
        match self.writers.send(job, start).await {
            Ok(()) => answer(STORE, outcome).await,
            // No tokio runtime to run a writer on: this save goes alone.
            Err(job) => self.replace_alone(&job).await,
        }
    }

    async fn lease(&self, key: &SessionKey, lease: Lease, now: Timestamp) -> Result<LeaseOutcome> {
        let hex = key.to_hex();
        let (now_arg, token, until) = (
            millis_arg(now),
            lease.token.to_string(),
            millis_arg(lease.until),
        );
        loop {
            let reply: Value = self
                .run(
                    &self.scripts.lease,
                    "lock session",
                    None,
                    &[
                        hex.as_bytes(),
                        now_arg.as_bytes(),
                        token.as_bytes(),
                        until.as_bytes(),
                    ],
                )
                .await?;
            let unexpected = || Error::backend(STORE, "unexpected reply from the lease script");
            let outcome = match reply {
                Value::Int(0) => LeaseOutcome::Missing,
                // The outcome as a MessagePack fixint, then the record the
                // script has just read.
                Value::BulkString(reply) => match reply.split_first() {
                    Some((1, packed)) => LeaseOutcome::Held(unpack_record(packed)?),
                    Some((2, packed)) => LeaseOutcome::Taken(unpack_record(packed)?),
                    _ => return Err(unexpected()),
                },
                Value::Int(3) => {
                    // Unreadable: `load` marks it for purge and reports the
                    // decode error; if it was rewritten meanwhile, try again.
                    self.load(key, now).await?;
                    continue;
                }
                _ => return Err(unexpected()),
            };
            return Ok(outcome);
        }
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
    async fn test_store() -> Option<RedisStore> {
        let url = std::env::var("SESSION2_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let connected = RedisStore::connect(&url).await;
        let store = crate::testing::require_server("redis", connected)?;
        let prefix = format!(
            "s2unit-{}",
            crate::SessionId::generate().key().fingerprint()
        );
        Some(store.with_prefix(prefix))
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
    fn a_store_given_another_prefix_saves_under_it_even_after_its_original_saved() {
        crate::testing::run(async {
            let Some(first) = test_store().await else {
                return;
            };
            let now = crate::Clock::now(&crate::SystemClock);
            let record = |version, data: &[u8]| record_at(now, version, data);
            let key = crate::SessionId::generate().key();
            // A save through the first store starts its writer.
            first.create(&key, &record(1, b"first"), now).await.unwrap();
            assert!(
                first
                    .replace(&key, 1, &record(2, b"first, saved"), now)
                    .await
                    .unwrap()
            );
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
    fn a_record_takes_as_many_arguments_as_counted() {
        let now = Timestamp::from_millis(1_000_000);
        let plain = Record::new(now, now.saturating_add(Duration::from_secs(60)), None);
        let user = Some("user".to_owned());
        let absolute_deadline = Some(now.saturating_add(Duration::from_secs(600)));
        let lease = Some(Lease {
            token: 7,
            until: now,
        });
        let records = [
            plain.clone(),
            Record {
                user: user.clone(),
                ..plain.clone()
            },
            Record {
                absolute_deadline,
                ..plain.clone()
            },
            Record {
                lease,
                ..plain.clone()
            },
            Record {
                user,
                absolute_deadline,
                lease,
                ..plain
            },
        ];
        for record in records {
            let mut call = Cmd::new();
            push_record(&mut call, &record, now);
            assert_eq!(
                call.args_iter().count(),
                record_arg_count(&record),
                "{record:?}"
            );
        }
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
            // Each save wrote its own fields only, not the arguments of the next.
            let mut connection = store.connection.clone();
            let mut fields: Vec<String> = redis::cmd("HKEYS")
                .arg(store.session_key_name(&a))
                .query_async(&mut connection)
                .await
                .unwrap();
            fields.sort_unstable();
            let mut expected = WRITTEN_FIELDS.to_vec();
            expected.extend(["indexed_expiry", "ttl_at"]);
            expected.sort_unstable();
            assert_eq!(fields, expected);
            store.delete(&a, None).await.unwrap();
            store.delete(&b, None).await.unwrap();
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

    #[test]
    fn record_fields_round_trip() {
        let now = Timestamp::from_millis(1_000);
        let mut record = Record::new(
            now,
            Timestamp::from_millis(5_000),
            Some(Timestamp::from_millis(3_000)),
        );
        record.user = Some("alice".into());
        record.lease = Some(Lease {
            token: u64::MAX,
            until: Timestamp::from_millis(2_000),
        });
        record.data = b"\xff\x00 not json".to_vec();
        let mut call = Cmd::new();
        push_record(&mut call, &record, now);
        let args: Vec<&[u8]> = call
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes,
                _ => unreachable!("a record is plain arguments"),
            })
            .collect();
        // Which optional fields it has, then when Redis drops the key: 2 s
        // of slack past 3 s.
        assert_eq!(args[..2], [b"111".as_slice(), b"5000"]);
        // Every optional field is set: the most arguments a record takes.
        assert_eq!(args.len(), record_size(&record).0);
        let (values, pairs) = args[2..].split_at(WRITTEN_FIELDS.len());
        assert_eq!(
            pairs[..2],
            [b"user".as_slice(), b"alice"],
            "the user comes first"
        );
        let written: Vec<(&[u8], &[u8])> = WRITTEN_FIELDS
            .iter()
            .map(|name| name.as_bytes())
            .zip(values.iter().copied())
            .chain(pairs.chunks(2).map(|pair| (pair[0], pair[1])))
            .collect();
        let read = RECORD_FIELDS
            .iter()
            .map(|name| {
                written
                    .iter()
                    .find(|(field, _)| *field == name.as_bytes())
                    .map_or(Value::Nil, |(_, value)| Value::BulkString(value.to_vec()))
            })
            .collect();
        assert_eq!(decode_record(Value::Array(read)).unwrap(), Some(record));
    }

    #[test]
    fn what_the_scripts_pack_unpacks_to_the_same_record() {
        crate::testing::run(async {
            let Some(store) = test_store().await else {
                return;
            };
            // ARGV[1] says which fields are present ('1') or absent; the
            // fields follow, as `read_record` gives them: false when absent.
            let script = Script::new(
                "local fields, present = {}, ARGV[1]\n\
                 for i = 1, #present do\n\
                   fields[i] = string.sub(present, i, i) == '1' and ARGV[i + 1]\n\
                 end\n\
                 return cmsgpack.pack(fields)",
            );
            // Data of every length class MessagePack frames differently
            // (fixstr, str8, str16, str32), binary bytes, and text that
            // looks like a frame.
            let sizes = [0, 1, 31, 32, 255, 256, 65_535, 65_536, 300_000];
            let data = sizes.map(|size| {
                (0..size)
                    .map(|byte| (byte % 251) as u8)
                    .collect::<Vec<u8>>()
            });
            let mut cases: Vec<[Option<&[u8]>; RECORD_FIELDS.len()]> = data
                .iter()
                .map(|data| {
                    let fields: [Option<&[u8]>; RECORD_FIELDS.len()] = [
                        Some(b"7"),
                        Some(b"5000"),
                        None,
                        Some(b"1000"),
                        Some(b"1500"),
                        Some(b"5000"),
                        None,
                        None,
                        None,
                        Some(data),
                    ];
                    fields
                })
                .collect();
            // Every field present, an empty user among them.
            for user in ["alice \u{e9}\u{2603}", ""] {
                cases.push([
                    Some(b"18446744073709551615"),
                    Some(b"3000"),
                    Some(user.as_bytes()),
                    Some(b"1000"),
                    Some(b"1000"),
                    Some(b"5000"),
                    Some(b"3000"),
                    Some(b"18446744073709551615"),
                    Some(b"2000"),
                    Some(b"\x9a\xc2\xdb"),
                ]);
            }
            for fields in cases {
                let mut connection = store.connection.clone();
                let present: String = fields
                    .iter()
                    .map(|field| if field.is_some() { '1' } else { '0' })
                    .collect();
                let mut invocation = script.prepare_invoke();
                invocation.arg(present);
                for field in fields {
                    invocation.arg(field.unwrap_or_default());
                }
                let packed: Vec<u8> = invocation.invoke_async(&mut connection).await.unwrap();
                // As `HMGET` gives them: an absent field is nil.
                let values = fields
                    .iter()
                    .map(|field| {
                        field.map_or(Value::Nil, |field| Value::BulkString(field.to_vec()))
                    })
                    .collect();
                let record = unpack_record(&packed).unwrap();
                assert_eq!(
                    Some(&record),
                    decode_record(Value::Array(values)).unwrap().as_ref()
                );
                assert_eq!(record.user.as_deref().map(str::as_bytes), fields[2]);
                assert_eq!(Some(record.data.as_slice()), fields[9]);
            }
        });
    }

    #[test]
    fn garbled_packed_records_are_decode_errors() {
        // version, expires_at, user, created_at, accessed_at, idle_deadline,
        // absolute_deadline, lease_token, lease_until, data
        let fields: [&[u8]; RECORD_FIELDS.len()] = [
            b"\xa17",
            b"\xc2",
            b"\xc0",
            b"\xa41000",
            b"\xd9\x041500",
            b"\xda\x00\x045000",
            b"\xc2",
            b"\xc2",
            b"\xc2",
            b"\xdb\x00\x00\x00\x02ok",
        ];
        let packed = |fields: &[&[u8]]| [&[0x9a], fields.concat().as_slice()].concat();
        let record = unpack_record(&packed(&fields)).unwrap();
        assert_eq!(
            (record.version, record.data.as_slice()),
            (7, b"ok".as_slice())
        );
        let with_data = |data: &[u8]| packed(&[&fields[..9], &[data]].concat());
        let garbled = [
            Vec::new(),
            vec![0x9a],
            fields.concat(),
            packed(&fields[..9]),
            [packed(&fields).as_slice(), b"\xc2"].concat(),
            [&[0x9b], fields.concat().as_slice(), b"\xc2"].concat(),
            with_data(b"\xa3ok"),
            with_data(b"\xa1ok"),
            with_data(b"\xd9"),
            with_data(b"\xda\x00"),
            with_data(b"\xdb\xff\xff\xff\xffok"),
            with_data(b"\x02"),
            with_data(b"\xc4\x02ok"),
        ];
        for packed in garbled {
            let err = unpack_record(&packed).unwrap_err();
            assert!(err.is_decode(), "{packed:?}: {err}");
        }
    }

    #[test]
    fn the_scripts_write_the_fixed_fields_in_order() {
        let named: Vec<String> = WRITTEN_FIELDS
            .iter()
            .enumerate()
            .map(|(at, field)| match at {
                0 => format!("'{field}', ARGV[v]"),
                _ => format!("'{field}', ARGV[v + {at}]"),
            })
            .collect();
        let hset = named.join(", ");
        let script: String = include_str!("redis_write.lua")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(script.contains(&hset), "`write` must set `{hset}`");
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
    }

    #[test]
    fn a_hash_without_record_fields_reads_as_missing() {
        let nothing = vec![Value::Nil; RECORD_FIELDS.len()];
        assert_eq!(decode_record(Value::Array(nothing)).unwrap(), None);
    }

    #[test]
    fn the_scripts_read_the_record_fields_in_order() {
        let quoted = |fields: &[&str]| {
            fields
                .iter()
                .map(|field| format!("'{field}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let head = format!(
            "redis.pcall('HMGET', skey, {}, ...)",
            quoted(&RECORD_FIELDS[..3])
        );
        let tail = format!("read_meta(skey, {})", quoted(&RECORD_FIELDS[3..]));
        for read in [head, tail] {
            assert!(
                include_str!("redis_prelude.lua").contains(&read),
                "the prelude must read `{read}`"
            );
        }
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
}
