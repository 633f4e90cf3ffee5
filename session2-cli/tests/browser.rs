//! The demo in a real browser: headless Chromium driven through WebDriver
//! (chromedriver), against the real `session2 demo` binary.
//!
//! Needs Debian's `chromium` and `chromium-driver` (the test command installs
//! them where missing). Without them the test fails under `CI=true` and is
//! skipped loudly elsewhere.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Demo;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running chromedriver; killed when dropped.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    fn start() -> std::io::Result<Self> {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(binary).exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{binary} is missing (apt-get install chromium chromium-driver)"),
                ));
            }
        }
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let driver = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "chromedriver did not listen within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(driver)
    }

    async fn browser(&self, profile: &Path) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1000,800",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a headless Chromium session")
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the element at `css` reads `expected`, and fails with what it
/// last read otherwise: after a click the browser may still show the old
/// page, or replace the element while it is being read.
async fn expect_text(browser: &Client, css: &str, expected: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::from("(not found)");
    while Instant::now() < deadline {
        if let Ok(element) = browser.find(Locator::Css(css)).await {
            // A stale element (the page was replaced meanwhile) is read again.
            if let Ok(text) = element.text().await {
                if text == expected {
                    return;
                }
                last = text;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{css}: expected {expected:?}, last read {last:?}. {what}");
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|err| panic!("{css}: {err}"))
        .click()
        .await
        .unwrap();
}

async fn screenshot(browser: &Client, name: &str) -> PathBuf {
    let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join(format!("{name}.png"));
    std::fs::write(&path, browser.screenshot().await.unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_works_in_a_real_browser_and_survives_a_restart() {
    let Some(driver) = session2::testing::require_server("chromedriver", ChromeDriver::start())
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let store = format!("dir:{}", work.path().join("store").display());
    // A fixed port, so the browser's cookie still applies after the restart.
    let port = free_port();
    let demo = Demo::start_on(&store, work.path(), port);
    let browser = driver.browser(&work.path().join("profile")).await;

    browser.goto(&demo.url("/")).await.unwrap();
    expect_text(&browser, "#counter", "Counter is at 0.", "").await;
    click(&browser, "#increment").await;
    expect_text(&browser, "#counter", "Counter is at 1.", "").await;
    click(&browser, "#increment").await;
    expect_text(&browser, "#counter", "Counter is at 2.", "").await;

    browser
        .find(Locator::Css("#user-name"))
        .await
        .unwrap()
        .send_keys("alice")
        .await
        .unwrap();
    click(&browser, "#login").await;
    expect_text(&browser, "#user", "Logged in as alice.", "").await;
    expect_text(
        &browser,
        "#counter",
        "Counter is at 2.",
        "login keeps the counter",
    )
    .await;

    // Restart the demo on the same store and port: the session survives.
    demo.stop();
    let demo = Demo::start_on(&store, work.path(), port);
    browser.refresh().await.unwrap();
    expect_text(&browser, "#counter", "Counter is at 2.", "").await;
    expect_text(&browser, "#user", "Logged in as alice.", "").await;
    screenshot(&browser, "logged-in").await;

    click(&browser, "#sessions-link").await;
    expect_text(&browser, "#session-count", "1 active session(s).", "").await;
    assert_eq!(
        browser
            .find_all(Locator::Css("tr.session"))
            .await
            .unwrap()
            .len(),
        1
    );
    expect_text(&browser, ".this-device", "this device", "").await;
    let sessions = screenshot(&browser, "sessions").await;
    assert!(
        std::fs::metadata(&sessions).unwrap().len() > 1_000,
        "a real PNG was written"
    );

    click(&browser, "#logout-everywhere").await;
    expect_text(
        &browser,
        "#counter",
        "Counter is at 0.",
        "the counter is gone",
    )
    .await;
    assert_eq!(browser.current_url().await.unwrap().path(), "/");
    expect_text(&browser, "#user", "Not logged in.", "").await;
    screenshot(&browser, "logged-out").await;
    browser.close().await.unwrap();
    drop(demo);
}
