//! The docs a newcomer follows, run as written: the README's "Using it" block, pasted in
//! order into a fresh shell (a scratch checkout whose `target/release` holds the binary
//! under test), and the benchmark scripts' way of finding the binary.

mod util;

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

const README: &str = include_str!("../README.md");

/// The first ```sh block after `heading`.
fn sh_block_after(heading: &str) -> &'static str {
    let from = README.find(heading).expect("the README has the heading");
    let rest = &README[from..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let len = rest[start..].find("```").expect("the block ends");
    &rest[start..start + len]
}

/// Issue 12, item 6: every line of "Using it" works pasted in order into a fresh shell,
/// and leaves no server running.
#[test]
fn the_quick_start_runs_as_written() {
    let block = sh_block_after("## Using it");
    let dir = tempfile::tempdir().unwrap();
    // A checkout after the build: target/release holds the binary under test.
    let checkout = dir.path().join("checkout");
    std::fs::create_dir_all(checkout.join("target")).unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    std::os::unix::fs::symlink(bin_dir, checkout.join("target/release")).unwrap();
    let scratch = dir.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    // `set -e`: a failing line fails the test (a person would see the error and stop).
    let script = format!("set -e\n{block}");
    // Output goes to files, not pipes: nothing reads a pipe until the end, and a block that
    // prints more than a pipe holds (64 KiB) would block on its write for ever.
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&checkout)
        .env("TMPDIR", &scratch)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id();
    let out = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The servers it started with `&` are in its process group; its last line stops
        // them (SIGTERM: each finishes within its grace period). Note any left, kill all.
        eventually(Duration::from_secs(8), || {
            process_group_members(group).is_empty()
        });
        let left = process_group_members(group);
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(group as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        (child.wait().unwrap(), left)
    });
    let (status, left) = out.join().unwrap();
    let stdout = String::from_utf8_lossy(&std::fs::read(&out_path).unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&std::fs::read(&err_path).unwrap()).into_owned();
    assert!(
        status.success(),
        "the quick start failed ({status:?}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(left.is_empty(), "servers left running: {left:?}\n{stderr}");
    for expect in [
        "\n!esrever ,olleH",                        // notes.txt reversed
        "\nhello\n",                                // through the Unix echo server
        "http://127.0.0.1:",                        // the HTTP server's address
        "requests    ",                             // a bench summary
        "\"requests\"",                             // the --json one
        "Key to the --compare table",               // the c10k comparison
        "backlog",                                  // the lab
        "experiments: 32 match the course",         // lab all
        "verified (sequence + CRC-32)",             // socklab ipc
        "lost 0  duplicates 0",                     // socklab bus bench
        "\nrefused\n",                              // a wrong password, on the guarded bus
        "owns com.example.Greeter\nHello, world\n", // socklab bus own, bus call
    ] {
        assert!(stdout.contains(expect), "no {expect:?} in:\n{stdout}");
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().count() == 6 && l.contains(':')),
        "no daytime line in:\n{stdout}"
    );
}

/// Issue 12, item 10: the benchmark scripts find the binary where cargo put it
/// (`CARGO_TARGET_DIR` included), never at a fixed `target/release`.
#[test]
fn bench_scripts_ask_cargo_where_the_binary_is() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("benches")).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "sh") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains("target/release"),
                "{} names target/release",
                path.display()
            );
            // lib.sh defines socklab_build; a script that runs no socklab binary (fuzz.sh
            // drives cargo-fuzz) says so in a comment.
            if path.file_name().unwrap() != "lib.sh" && !text.contains("# runs no socklab binary") {
                assert!(
                    text.contains("socklab=$(socklab_build)"),
                    "{} does not use socklab_build",
                    path.display()
                );
            }
            let syntax = Command::new("bash").arg("-n").arg(&path).status().unwrap();
            assert!(syntax.success(), "{}", path.display());
        }
    }
    // socklab_build reports the executable cargo names: a stand-in `cargo` prints the JSON
    // messages a real one prints for a target directory elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere/release/socklab");
    std::fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    std::fs::copy(BIN, &elsewhere).unwrap();
    let fake = dir.path().join("bin");
    std::fs::create_dir(&fake).unwrap();
    let cargo = fake.join("cargo");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\n[ \"$*\" = 'build --release --message-format=json-render-diagnostics' ] || exit 9\n\
             echo '{{\"reason\":\"compiler-artifact\",\"target\":{{\"name\":\"libc\"}},\"executable\":null}}'\n\
             echo '{{\"reason\":\"compiler-artifact\",\"target\":{{\"name\":\"socklab\"}},\"executable\":\"{}\"}}'\n\
             echo '{{\"reason\":\"build-finished\",\"success\":true}}'\n",
            elsewhere.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg("source benches/lib.sh && socklab_build")
        .current_dir(root)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        elsewhere.to_str().unwrap()
    );
}
