//! What a user meets before any traffic: a busy port refused by every design, errors of one
//! line with their cause said once and exit 2 for mistakes, value lists in any case, shell
//! completions and the man page.

mod util;

use std::process::Command;
use util::*;

/// stderr of a run, asserting it is exactly one `socklab: error:` line.
#[track_caller]
fn one_error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "not one line:\n{err}");
    assert!(err.starts_with("socklab: error: "), "{err}");
    err
}

/// Assert that no part of `text` of at least `len` characters after a `: ` is said twice
/// (the cause repeated: "refused (os error 111): Connection refused (os error 111)").
#[track_caller]
fn cause_said_once(text: &str) {
    let parts: Vec<&str> = text.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        for q in &parts[i + 1..] {
            assert!(p.len() < 8 || !q.contains(p), "cause repeated in {text:?}");
        }
    }
}

/// Issue 12, item 2: a second server on a busy port is refused with one line and exit 2,
/// whichever design holds the port and whichever comes second, the default (reactors,
/// whose listeners share the port with `SO_REUSEPORT`) included.
#[test]
fn a_busy_port_is_refused_by_every_design() {
    let pairs = MODELS
        .iter()
        .map(|m| (*m, "reactors"))
        .chain(MODELS.iter().map(|m| ("reactors", *m)));
    for (first, second) in pairs {
        let srv = Server::tcp("echo", first, &[]);
        let out = Command::new(BIN)
            .args(["serve", "echo", "--model", second, "--listen", &srv.addr])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{second} started beside {first} on {}: {out:?}",
            srv.addr
        );
        let err = one_error_line(&out);
        assert!(err.contains("in use") && err.contains(&srv.addr), "{err}");
        cause_said_once(&err);
        assert!(out.stdout.is_empty(), "it printed an address: {out:?}");
        // The first one still answers, alone.
        let mut s = srv.connect();
        use std::io::{Read, Write};
        s.write_all(b"still me").unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"still me", "{first}");
        drop(s);
        assert!(srv.stop().0.success(), "{first}");
    }
}

/// Item 7: errors are one line, the cause said once, and user mistakes exit 2.
#[test]
fn errors_are_one_line_with_their_cause_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = Command::new(BIN)
        .args(["client", "daytime", &closed])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = one_error_line(&out);
    assert!(err.contains("refused"), "{err}");
    cause_said_once(&err);

    // A live Unix socket is not taken over.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let p = path.to_str().unwrap();
    let srv = Server::start(&["echo", "--model", "epoll", "--unix", p]);
    let out = Command::new(BIN)
        .args(["serve", "echo", "--unix", p])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = one_error_line(&out);
    assert!(err.contains("a server is listening there"), "{err}");
    cause_said_once(&err);
    assert!(srv.stop().0.success());

    // A missing input file is the user's to fix.
    let out = Command::new(BIN)
        .args(["client", "reverse", &closed, "/no/such/file"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    cause_said_once(&one_error_line(&out));

    // The lab's unknown experiment speaks like everything else.
    let out = Command::new(BIN).args(["lab", "nosuch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_error_line(&out).contains("socklab lab --list"));

    // clap's mistakes: one line naming the accepted values, not six lines of usage.
    for args in [
        &["serve", "echo", "--model", "nosuch"][..],
        &["bench", "--service", "smtp"],
        &["serve"],
        &["bench", "--no-such-flag"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = one_error_line(&out);
        if args.contains(&"nosuch") {
            assert!(err.contains("iterative") && err.contains("tokio"), "{err}");
        }
    }
}

/// Item 7: value lists accept any case (`--model Epoll` is epoll, not a hint at `poll`).
#[test]
fn values_in_any_case() {
    let srv = Server::start(&["echo", "--model", "Epoll", "--listen", "127.0.0.1:0"]);
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    assert!(err.contains("model=epoll"), "{err}");
    let out = Command::new(BIN)
        .args(["bench", "--service", "REVERSE", "127.0.0.1:9", "-n", "0"])
        .output()
        .unwrap();
    // Parsed (the service is fine); refused for -n 0, by socklab, not clap.
    assert!(one_error_line(&out).contains("--requests"));
}

/// Shell completions and the man page come from the same definitions as --help.
#[test]
fn completions_and_man_page() {
    let gen = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = gen(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("socklab.bash");
    std::fs::write(&script, &bash).unwrap();
    // bash loads it, and completes the subcommands and the models.
    let check = Command::new("bash")
        .arg("-c")
        .arg(
            r#"source "$1" && complete -p socklab >/dev/null &&
               COMP_WORDS=(socklab serve echo --model ep) COMP_CWORD=4 COMP_LINE="socklab serve echo --model ep" COMP_POINT=${#COMP_LINE} &&
               _socklab socklab ep --model && printf '%s\n' "${COMPREPLY[@]}""#,
        )
        .arg("bash")
        .arg(&script)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("epoll"),
        "{check:?}"
    );
    assert!(gen(&["completions", "zsh"]).starts_with("#compdef socklab"));
    assert!(gen(&["completions", "fish"]).contains("complete -c socklab"));
    let man = gen(&["man"]);
    assert!(
        man.contains(".TH socklab"),
        "{}",
        &man[..200.min(man.len())]
    );
    for sub in ["serve", "client", "bench", "lab", "completions"] {
        assert!(man.contains(sub), "the man page lacks {sub}");
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
