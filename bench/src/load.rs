//! The load generator: V virtual users, each with its own keep-alive
//! connection and its own cookie, in a closed loop; a warm-up, then a
//! measured window. Every answer is checked: a counter must go up by exactly
//! one per read-modify-write, a read must equal the last write. Lost updates
//! and mismatches are counted and reported, never ignored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use axum::http::{Method, StatusCode};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Workload {
    /// Read-modify-write of a counter, one session per user (plain session).
    Rmw,
    /// The same through session2's exclusive session.
    RmwExclusive,
    /// Read only.
    Read,
    /// The handler does not touch the session.
    Anon,
    /// 90% read-modify-write, 5% read, 3% login, 2% logout (`--mix` changes the shares).
    Mix,
    /// All users share one session, read-modify-write (plain).
    Contention,
    /// All users share one session through the exclusive session.
    ContentionExclusive,
}

#[derive(Debug, clap::Args)]
pub(crate) struct LoadArgs {
    /// The server, as `127.0.0.1:PORT`.
    #[arg(long)]
    pub(crate) address: SocketAddr,
    #[arg(long, value_enum)]
    pub(crate) workload: Workload,
    #[arg(long, default_value_t = 64)]
    pub(crate) users: usize,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// The server's process, whose CPU time in the measured window is
    /// reported per request.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Names of the store server's processes (`postgres`, `mariadbd`,
    /// `redis-server`), charged the same way; looked up when the measured
    /// window opens, so connections the warm-up opened count.
    #[arg(long, value_delimiter = ',')]
    pub(crate) store_processes: Vec<String>,
    /// The mix workload's shares in percent: read-modify-write, read,
    /// login, logout (`0,0,100,0` times logins alone).
    #[arg(long, default_value = "90,5,3,2")]
    pub(crate) mix: Mix,
}

/// The shares of the mix workload's routes, in percent (they add up to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mix {
    rmw: u64,
    read: u64,
    login: u64,
    logout: u64,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            rmw: 90,
            read: 5,
            login: 3,
            logout: 2,
        }
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let shares = text
            .split(',')
            .map(|share| {
                share
                    .trim()
                    .parse::<u64>()
                    .map_err(|err| format!("`{share}`: {err}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let [rmw, read, login, logout] = shares[..] else {
            return Err("four percentages: read-modify-write, read, login, logout".to_owned());
        };
        let total = rmw + read + login + logout;
        if total != 100 {
            return Err(format!("the shares add up to {total}, not 100"));
        }
        Ok(Self {
            rmw,
            read,
            login,
            logout,
        })
    }
}

impl Mix {
    /// The route a draw in `0..100` picks.
    fn route(self, draw: u64) -> (Method, &'static str) {
        let read_from = self.rmw;
        let login_from = read_from + self.read;
        let logout_from = login_from + self.login;
        match draw {
            _ if draw < read_from => (Method::POST, "/rmw"),
            _ if draw < login_from => (Method::GET, "/read"),
            _ if draw < logout_from => (Method::POST, "/login"),
            _ => (Method::POST, "/logout"),
        }
    }
}

/// One measurement, printed as a JSON line.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct LoadResult {
    pub(crate) workload: String,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) mismatches: u64,
    pub(crate) lost_updates: u64,
    pub(crate) requests_per_second: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    /// CPU time of the server process per measured request, in µs: unlike
    /// requests/s, it hardly depends on what else the 2 cores are doing.
    #[serde(default)]
    pub(crate) server_cpu_us: Option<f64>,
    /// CPU time of the store server's processes per measured request, in µs.
    #[serde(default)]
    pub(crate) store_cpu_us: Option<f64>,
    /// CPU time of the load generator itself per measured request, in µs:
    /// with the server's and the store's, what one request costs the
    /// machine's cores.
    #[serde(default)]
    pub(crate) load_cpu_us: Option<f64>,
}

/// CPU time (user + system) a process has used so far, in µs; `None` once it is gone.
pub(crate) fn cpu_time_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1e6 / per_second)
}

/// CPU time of `pids` together, in µs, counting only the processes alive at both samples.
fn cpu_sample(pids: &[u32]) -> Vec<Option<f64>> {
    pids.iter().map(|pid| cpu_time_us(*pid)).collect()
}

fn cpu_used(before: &[Option<f64>], after: &[Option<f64>]) -> f64 {
    before
        .iter()
        .zip(after)
        .filter_map(|(before, after)| Some(after.as_ref()? - before.as_ref()?))
        .sum()
}

/// CPU time used in a window by the server, the store's processes and the
/// load generator, from samples taken in the order `[server (if
/// `with_server`), store processes…, load generator]` at its start and end.
#[derive(Debug, PartialEq)]
struct CpuShares {
    server: f64,
    store: f64,
    load: f64,
}

fn cpu_shares(before: &[Option<f64>], after: &[Option<f64>], with_server: bool) -> CpuShares {
    let stores = usize::from(with_server)..before.len().saturating_sub(1);
    CpuShares {
        server: cpu_used(&before[..stores.start], &after[..stores.start]),
        store: cpu_used(&before[stores.clone()], &after[stores.clone()]),
        load: cpu_used(&before[stores.end..], &after[stores.end..]),
    }
}

/// The processes whose name (`/proc/PID/comm`) starts with one of `names`.
fn pids_named(names: &[String]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| names.iter().any(|name| comm.trim().starts_with(name)))
        })
        .collect()
}

/// One keep-alive HTTP/1.1 connection with a cookie jar of one cookie.
///
/// It writes each request and reads its answer in the virtual user's own
/// task, with `httparse` for the head: hyper's client runs each connection
/// as a task of its own and hands every request and answer between the two
/// tasks, which cost about as much CPU as a request to the benchmarked
/// server. The load generator shares the 2 cores with the servers it
/// measures, so what it spends is taken from both libraries alike.
pub(crate) struct Connection {
    address: SocketAddr,
    stream: Option<TcpStream>,
    cookie: Option<String>,
    /// Bytes read and not yet consumed: the answer being read.
    buffer: Vec<u8>,
}

/// The most bytes an answer's head may take.
const MAX_HEAD: usize = 16 * 1024;

/// What one answer's head says.
#[derive(Debug, PartialEq)]
struct Head {
    status: StatusCode,
    /// The head's length in bytes, up to and including the blank line.
    length: usize,
    body_length: usize,
    /// The cookie pair the answer sets, `Some(None)` when it revokes it.
    cookie: Option<Option<String>>,
    close: bool,
}

/// The answer head at the start of `bytes`; `None` while it is incomplete.
fn parse_head(bytes: &[u8]) -> anyhow::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(length) = response.parse(bytes)? else {
        anyhow::ensure!(
            bytes.len() < MAX_HEAD,
            "an answer head over {MAX_HEAD} bytes"
        );
        return Ok(None);
    };
    let status = StatusCode::from_u16(response.code.context("no status")?)?;
    let mut body_length = None;
    let mut cookie = None;
    let mut close = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value)?;
        if header.name.eq_ignore_ascii_case("content-length") {
            body_length = Some(value.trim().parse()?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::bail!("a body of unknown length (transfer-encoding: {value})");
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        } else if header.name.eq_ignore_ascii_case("set-cookie") {
            let pair = value.split(';').next().unwrap_or_default().trim();
            let revoked = value.contains("Max-Age=0") || pair.ends_with('=');
            cookie = Some((!revoked).then(|| pair.to_owned()));
        }
    }
    Ok(Some(Head {
        status,
        length,
        body_length: body_length.unwrap_or(0),
        cookie,
        close,
    }))
}

impl Connection {
    pub(crate) fn new(address: SocketAddr) -> Self {
        Self {
            address,
            stream: None,
            cookie: None,
            buffer: Vec::with_capacity(1024),
        }
    }

    pub(crate) async fn call(
        &mut self,
        method: Method,
        path: &str,
    ) -> anyhow::Result<(StatusCode, String)> {
        let answer = self.exchange(method, path).await;
        if answer.is_err() {
            // What is left of a failed exchange would be read as the next answer.
            self.stream = None;
        }
        answer
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
    ) -> anyhow::Result<(StatusCode, String)> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.address).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buffer.clear();
        }
        let stream = self.stream.as_mut().expect("connected above");
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        if let Some(cookie) = &self.cookie {
            request.push_str("cookie: ");
            request.push_str(cookie);
            request.push_str("\r\n");
        }
        if method == Method::POST {
            request.push_str("content-length: 0\r\n");
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let head = loop {
            if let Some(head) = parse_head(&self.buffer)? {
                break head;
            }
            read_more(stream, &mut self.buffer).await?;
        };
        let end = head.length + head.body_length;
        while self.buffer.len() < end {
            read_more(stream, &mut self.buffer).await?;
        }
        let body = String::from_utf8_lossy(&self.buffer[head.length..end]).into_owned();
        self.buffer.drain(..end);
        if let Some(cookie) = head.cookie {
            self.cookie = cookie;
        }
        if head.close {
            self.stream = None;
        }
        Ok((head.status, body))
    }
}

/// Reads what `stream` has into the end of `buffer`; an error at its end.
async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    buffer.reserve(1024);
    anyhow::ensure!(
        stream.read_buf(buffer).await? > 0,
        "the server closed the connection"
    );
    Ok(())
}

struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
    acknowledged: AtomicU64,
}

fn parse(body: &str) -> anyhow::Result<i64> {
    body.trim()
        .parse()
        .map_err(|_| anyhow!("unexpected body {body:?}"))
}

pub(crate) async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let result = measure(&args).await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

pub(crate) async fn measure(args: &LoadArgs) -> anyhow::Result<LoadResult> {
    let counters = Arc::new(Counters {
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        acknowledged: AtomicU64::new(0),
    });
    let shared = matches!(
        args.workload,
        Workload::Contention | Workload::ContentionExclusive
    );
    let path = match args.workload {
        Workload::RmwExclusive | Workload::ContentionExclusive => "/rmw-exclusive",
        _ => "/rmw",
    };
    // The shared session of the contention workloads, made before the clock starts.
    let mut first = Connection::new(args.address);
    let shared_cookie = if shared {
        let (_, body) = first
            .call(Method::POST, path)
            .await
            .context("creating the shared session")?;
        anyhow::ensure!(parse(&body)? == 1, "a new session starts at 1");
        Some(first.cookie.clone().context("the server set no cookie")?)
    } else {
        None
    };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut users = Vec::new();
    for user in 0..args.users {
        let counters = Arc::clone(&counters);
        let workload = args.workload;
        let mix = args.mix;
        let address = args.address;
        let shared_cookie = shared_cookie.clone();
        users.push(tokio::spawn(async move {
            let mut connection = Connection::new(address);
            connection.cookie = shared_cookie;
            virtual_user(
                workload,
                mix,
                path,
                user as u64,
                &mut connection,
                &counters,
                measure_from..end,
            )
            .await
        }));
    }
    let cpu_before = {
        let (server_pid, store_processes) = (args.server_pid, args.store_processes.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let watched: Vec<u32> = server_pid
                .into_iter()
                .chain(pids_named(&store_processes))
                .chain([std::process::id()])
                .collect();
            let sample = cpu_sample(&watched);
            (watched, sample)
        })
    };
    let mut latencies = Vec::new();
    for user in users {
        latencies.extend(user.await??);
    }
    let (watched, cpu_before) = cpu_before.await?;
    let cpu = cpu_shares(
        &cpu_before,
        &cpu_sample(&watched),
        args.server_pid.is_some(),
    );
    let mut lost_updates = 0;
    if shared {
        let (_, body) = first.call(Method::GET, "/read").await?;
        let expected = 1 + counters.acknowledged.load(Ordering::SeqCst) as i64;
        lost_updates = u64::try_from(expected - parse(&body)?).unwrap_or(0);
    }
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get(latencies.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    let requests = latencies.len() as u64;
    Ok(LoadResult {
        workload: format!("{:?}", args.workload),
        requests,
        errors: counters.errors.load(Ordering::SeqCst),
        mismatches: counters.mismatches.load(Ordering::SeqCst),
        lost_updates,
        requests_per_second: requests as f64 / args.duration,
        p50_us: percentile(50),
        p99_us: percentile(99),
        server_cpu_us: args.server_pid.map(|_| cpu.server / requests.max(1) as f64),
        store_cpu_us: (!args.store_processes.is_empty())
            .then(|| cpu.store / requests.max(1) as f64),
        load_cpu_us: Some(cpu.load / requests.max(1) as f64),
    })
}

async fn virtual_user(
    workload: Workload,
    mix: Mix,
    rmw_path: &'static str,
    seed: u64,
    connection: &mut Connection,
    counters: &Counters,
    measured: std::ops::Range<Instant>,
) -> anyhow::Result<Vec<u64>> {
    let (measure_from, end) = (measured.start, measured.end);
    let mut latencies = Vec::new();
    let mut random = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    // The counter this user's own session should hold.
    let mut expected: i64 = 0;
    if matches!(workload, Workload::Read) {
        expected = parse(&connection.call(Method::POST, "/rmw").await?.1)?;
    }
    loop {
        let began = Instant::now();
        if began >= end {
            return Ok(latencies);
        }
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let (method, path) = match workload {
            Workload::Rmw
            | Workload::RmwExclusive
            | Workload::Contention
            | Workload::ContentionExclusive => (Method::POST, rmw_path),
            Workload::Read => (Method::GET, "/read"),
            Workload::Anon => (Method::GET, "/anon"),
            Workload::Mix => mix.route(random % 100),
        };
        let answer = connection.call(method, path).await;
        let took = began.elapsed();
        let measured = began >= measure_from;
        if measured {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            latencies.push(took.as_micros() as u64);
        }
        let (status, body) = match answer {
            Ok((status, body)) if status.is_success() => (status, body),
            Ok(_) | Err(_) => {
                if measured {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        let _ = status;
        let correct = match (workload, path) {
            (Workload::Anon, _) => body == "ok" && connection.cookie.is_none(),
            (Workload::Contention | Workload::ContentionExclusive, _) => {
                counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                true
            }
            (_, "/rmw" | "/rmw-exclusive") => {
                let value = parse(&body)?;
                let ok = value == expected + 1;
                expected = value;
                ok
            }
            (_, "/read" | "/login") => parse(&body)? == expected,
            (_, "/logout") => {
                expected = 0;
                connection.cookie.is_none()
            }
            _ => true,
        };
        if !correct && measured {
            counters.mismatches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_picks_routes_by_their_shares() {
        let mix: Mix = "90,5,3,2".parse().unwrap();
        assert_eq!(mix, Mix::default());
        let routes: Vec<&str> = (0..100).map(|draw| mix.route(draw).1).collect();
        let count = |path: &str| routes.iter().filter(|route| **route == path).count();
        let shares = [
            count("/rmw"),
            count("/read"),
            count("/login"),
            count("/logout"),
        ];
        assert_eq!(shares, [90, 5, 3, 2]);
        assert_eq!(mix.route(94), (Method::GET, "/read"));
        let logins: Mix = "0, 0, 100, 0".parse().unwrap();
        assert!((0..100).all(|draw| logins.route(draw) == (Method::POST, "/login")));
        assert!("90,5,3".parse::<Mix>().is_err());
        assert!("90,5,3,3".parse::<Mix>().unwrap_err().contains("101"));
        assert!("90,5,x,2".parse::<Mix>().is_err());
    }

    #[test]
    fn cpu_is_shared_out_to_server_store_and_load_generator() {
        let before = [Some(10.0), Some(5.0), Some(1.0), Some(100.0)];
        // The third process (a store connection) ended in the window: not counted.
        let after = [Some(20.0), Some(9.0), None, Some(130.0)];
        let expected = CpuShares {
            server: 10.0,
            store: 4.0,
            load: 30.0,
        };
        assert_eq!(cpu_shares(&before, &after, true), expected);
        let without_server = CpuShares {
            server: 0.0,
            store: 14.0,
            load: 30.0,
        };
        assert_eq!(cpu_shares(&before, &after, false), without_server);
    }

    #[test]
    fn a_head_gives_status_length_and_cookie() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nset-cookie: id=abc; Path=/; HttpOnly\r\n\r\n41";
        let head = parse_head(answer).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                status: StatusCode::OK,
                length: answer.len() - 2,
                body_length: 2,
                cookie: Some(Some("id=abc".to_owned())),
                close: false,
            }
        );
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
    }

    #[test]
    fn a_revoked_cookie_and_a_closing_answer_are_seen() {
        for revoking in ["id=; Max-Age=0", "id=; Path=/", "id=abc; Max-Age=0; Path=/"] {
            let answer = format!(
                "HTTP/1.1 303 See Other\r\nSet-Cookie: {revoking}\r\nConnection: close\r\n\r\n"
            );
            let head = parse_head(answer.as_bytes()).unwrap().unwrap();
            assert_eq!(head.cookie, Some(None), "{revoking}");
            assert!(head.close);
            assert_eq!((head.status, head.body_length), (StatusCode::SEE_OTHER, 0));
        }
    }

    #[test]
    fn a_body_of_unknown_length_is_an_error() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(parse_head(answer).is_err());
        let oversized = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(parse_head(oversized.as_bytes()).is_err());
    }
}
