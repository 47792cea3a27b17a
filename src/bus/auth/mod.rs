//! Who may join the bus and what they may do there: authentication (password files, TLS
//! client certificates, a Unix-socket peer's uid), access control (ACL files), and the
//! limits that make guessing passwords slow.
//!
//! | file | part |
//! | --- | --- |
//! | [`passwd`] | password files (`USER:argon2id-hash`) and `socklab bus passwd` |
//! | [`acl`] | ACL files (mosquitto's syntax, plus D-Bus-style `own`/`call` name rules) and their matcher |
//! | [`ratelimit`] | failed logins limited per source, in bounded memory |
//! | [`tls`] | rustls configurations, the server's non-blocking TLS connection, the clients' stream |
//! | this file | [`Policy`] (the files, loaded; the broker's [`Authorizer`]) and [`Gate`] (CONNECT checked, password hashes verified on threads of their own) |
//!
//! Authentication happens before the broker sees a CONNECT: the server asks the [`Gate`],
//! which answers at once (anonymous, certificate, peer uid, no password file, refused,
//! slowed) or hands the password to a verifier thread -- Argon2 takes tens of milliseconds
//! on purpose, and must not stall an event loop, let alone the broker. The broker is then
//! given an [`Identity`] whose user name is the one established, and asks the [`Policy`]
//! (as its [`Authorizer`]) about every publish, subscription, delivery and name.

pub mod acl;
pub mod passwd;
pub mod ratelimit;
pub mod tls;

use super::broker::{Authorizer, Identity, Verified};
use acl::{Acl, SubAccess, Want, Who};
use bytes::Bytes;
use mqtt_proto::v5::ConnectReasonCode as Crc;
use passwd::Passwords;
use ratelimit::{LimitConfig, LoginLimiter, Source};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// The authentication and access-control settings of `bus serve`.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The password file.
    pub passwords: Option<PathBuf>,
    /// The ACL file.
    pub acl: Option<PathBuf>,
    /// Whether clients without a user name may connect [default: yes without a password
    /// file, no with one].
    pub allow_anonymous: Option<bool>,
    /// Over a Unix socket, a client that sends no user name is the peer's user
    /// (`SO_PEERCRED`), by login name (or uid number if it has none).
    pub unix_peer_user: bool,
    /// What a verified TLS client certificate makes the user name.
    pub cert_identity: tls::CertIdentity,
    /// Failed logins per source.
    pub limit: LimitConfig,
}

impl AuthConfig {
    /// Whether anything is checked at all (otherwise the broker lets everyone do anything).
    pub fn active(&self) -> bool {
        self.passwords.is_some() || self.acl.is_some() || self.allow_anonymous == Some(false)
    }
}

/// The password and ACL files, loaded; replaced whole when SIGHUP rereads them.
#[derive(Debug)]
pub struct Policy {
    passwords: Option<Passwords>,
    acl: Option<Acl>,
    allow_anonymous: bool,
    /// Verified for unknown users, so that they take as long as known ones.
    dummy_hash: String,
}

impl Policy {
    /// A policy from parts already loaded.
    pub fn new(passwords: Option<Passwords>, acl: Option<Acl>, allow_anonymous: bool) -> Policy {
        let dummy_hash = passwords
            .as_ref()
            .map(|_| passwd::hash(b"socklab: a password no user has").unwrap_or_default())
            .unwrap_or_default();
        Policy {
            passwords,
            acl,
            allow_anonymous,
            dummy_hash,
        }
    }

    /// Read the files `cfg` names.
    ///
    /// # Errors
    /// An unreadable or malformed file (the message names it and the line).
    pub fn load(cfg: &AuthConfig) -> anyhow::Result<Policy> {
        let passwords = cfg.passwords.as_deref().map(Passwords::load).transpose()?;
        let acl = match &cfg.acl {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("cannot read ACL file {}: {e}", p.display()))?;
                Some(
                    Acl::parse(&text)
                        .map_err(|e| anyhow::anyhow!("ACL file {}: {e}", p.display()))?,
                )
            }
            None => None,
        };
        let anonymous = cfg.allow_anonymous.unwrap_or(passwords.is_none());
        Ok(Policy::new(passwords, acl, anonymous))
    }

    /// Check `password` for `user` (the slow part: Argon2). Unknown users cost the same.
    pub fn check_password(&self, user: &str, password: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(pw) = self.passwords.as_ref() else {
            return Ok(());
        };
        let stored = pw.hash_of(user);
        let hash = stored.unwrap_or(&self.dummy_hash);
        let ok = passwd::verify_hash(hash, password.unwrap_or(b""));
        match (stored, password, ok) {
            (None, _, _) => Err("unknown user"),
            (Some(_), None, _) => Err("no password"),
            (Some(_), Some(_), false) => Err("wrong password"),
            (Some(_), Some(_), true) => Ok(()),
        }
    }

    fn who<'a>(identity: &'a Identity) -> Who<'a> {
        Who {
            user: identity.username.as_deref(),
            client_id: &identity.client_id,
        }
    }
}

impl Authorizer for Policy {
    /// The password was checked by the [`Gate`]; here: anonymous clients, and (on reload)
    /// password users who are no longer in the file.
    fn connect(&self, who: &Identity, _password: Option<&[u8]>) -> Result<(), Crc> {
        match (&who.username, who.verified) {
            (None, _) if !self.allow_anonymous => Err(Crc::NotAuthorized),
            (Some(u), Verified::Password) => match &self.passwords {
                Some(p) if !p.contains(u) => Err(Crc::NotAuthorized),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    fn publish(&self, who: &Identity, topic: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.topic(&Policy::who(who), topic, Want::Write))
    }

    fn subscribe(&self, who: &Identity, filter: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.subscribe(&Policy::who(who), filter) != SubAccess::Denied)
    }

    fn subscribe_filtered(&self, who: &Identity, filter: &str) -> bool {
        self.acl
            .as_ref()
            .is_some_and(|a| a.subscribe(&Policy::who(who), filter) == SubAccess::Filtered)
    }

    fn read(&self, who: &Identity, topic: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.topic(&Policy::who(who), topic, Want::Read))
    }

    /// The ACL's `own` rules (D-Bus's `own` / `own_prefix`).
    fn own(&self, who: &Identity, name: &str) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.own(&Policy::who(who), name))
    }

    /// The ACL's `call` rules (D-Bus's `send_destination`, `send_interface`, `send_member`).
    fn call(
        &self,
        who: &Identity,
        destination: &str,
        interface: Option<&str>,
        member: &str,
    ) -> bool {
        self.acl
            .as_ref()
            .is_none_or(|a| a.call(&Policy::who(who), destination, interface, member))
    }
}

/// A refused login: the CONNACK reason (3.1.1 gets the closest return code) and why, for
/// the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The 5.0 reason code.
    pub code: Crc,
    /// What happened.
    pub why: &'static str,
}

/// What the server knows of a client when its CONNECT arrives.
#[derive(Debug, Clone, Default)]
pub struct Login {
    /// CONNECT's user name.
    pub username: Option<Arc<str>>,
    /// CONNECT's password (never logged).
    pub password: Option<Bytes>,
    /// The peer's address.
    pub peer: String,
    /// The Unix-socket peer's uid.
    pub peer_uid: Option<u32>,
    /// The user name a verified TLS client certificate gives.
    pub cert_user: Option<String>,
}

/// The outcome of a login: who the client is (`None`: anonymous) and how that was
/// established, or why it was refused.
pub type Outcome = Result<(Option<Arc<str>>, Verified), Refusal>;

/// A password to verify off the event loop.
#[derive(Debug)]
pub struct Job {
    user: Arc<str>,
    password: Option<Bytes>,
    source: Source,
    peer: String,
    policy: Arc<Policy>,
}

/// The first look at a login.
#[derive(Debug)]
pub enum Step {
    /// Decided.
    Done(Outcome),
    /// A password to verify ([`Gate::submit`]).
    Verify(Job),
}

type Reply = Box<dyn FnOnce(Outcome) + Send>;

/// The doorkeeper: the current [`Policy`], the failed-login limiter, and the verifier
/// threads.
pub struct Gate {
    cfg: AuthConfig,
    policy: RwLock<Arc<Policy>>,
    limiter: Arc<Mutex<LoginLimiter>>,
    jobs: Mutex<Option<mpsc::SyncSender<(Job, Reply)>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("cfg", &self.cfg).finish()
    }
}

/// Password checks waiting for a verifier at most; past it, logins are refused as "server
/// busy" (each waiting check holds a CONNECT; the verifiers' speed bounds the CPU).
const QUEUE: usize = 1024;

fn user_of_uid(uid: u32) -> Arc<str> {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name.into(),
        _ => uid.to_string().into(),
    }
}

impl Gate {
    /// Load the files and start `threads` verifier threads.
    ///
    /// # Errors
    /// The files ([`Policy::load`]), or a thread that cannot be started.
    pub fn start(cfg: AuthConfig, threads: usize) -> anyhow::Result<Arc<Gate>> {
        let policy = Arc::new(Policy::load(&cfg)?);
        let limiter = Arc::new(Mutex::new(LoginLimiter::new(cfg.limit)));
        let (tx, rx) = mpsc::sync_channel::<(Job, Reply)>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let limiter = limiter.clone();
            std::thread::Builder::new()
                .name(format!("bus-auth-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((job, reply)) = next else {
                        return;
                    };
                    reply(verify(job, &limiter));
                })?;
        }
        Ok(Arc::new(Gate {
            cfg,
            policy: RwLock::new(policy),
            limiter,
            jobs: Mutex::new(Some(tx)),
        }))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reread the files; the old policy stays if they are bad.
    ///
    /// # Errors
    /// An unreadable or malformed file.
    pub fn reload(&self) -> anyhow::Result<Arc<Policy>> {
        let fresh = Arc::new(Policy::load(&self.cfg)?);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    /// Login attempts refused by the limiter so far.
    pub fn slowed(&self) -> u64 {
        self.limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused()
    }

    /// Decide what can be decided at once; a password goes to [`Gate::submit`].
    pub fn start_login(&self, login: Login, now: Instant) -> Step {
        let policy = self.policy();
        if let Some(u) = login.cert_user {
            return Step::Done(Ok((Some(u.into()), Verified::Certificate)));
        }
        let username = login.username.filter(|u| !u.is_empty());
        let Some(user) = username else {
            if self.cfg.unix_peer_user {
                if let Some(uid) = login.peer_uid {
                    return Step::Done(Ok((Some(user_of_uid(uid)), Verified::PeerCred)));
                }
            }
            if login.password.is_some() {
                return Step::Done(Err(Refusal {
                    code: Crc::BadUserNameOrPassword,
                    why: "password without a user name",
                }));
            }
            return Step::Done(if policy.allow_anonymous {
                Ok((None, Verified::None))
            } else {
                Err(Refusal {
                    code: Crc::NotAuthorized,
                    why: "anonymous clients are not allowed",
                })
            });
        };
        if policy.passwords.is_none() {
            // No password file: the user name is taken as given (as mosquitto does).
            return Step::Done(Ok((Some(user), Verified::None)));
        }
        let source = Source::of(&login.peer, login.peer_uid);
        let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if !l.allows(source, now) {
            l.begin(source, now); // counted as refused
            drop(l);
            tracing::warn!(user = %user, peer = %login.peer, "login refused: too many failed logins from this source");
            return Step::Done(Err(SLOWED));
        }
        drop(l);
        Step::Verify(Job {
            user,
            password: login.password,
            source,
            peer: login.peer,
            policy,
        })
    }

    /// Verify on a verifier thread; `reply` is called there with the outcome. If too many
    /// checks wait already, `reply` is called at once with "server busy".
    pub fn submit(&self, job: Job, reply: impl FnOnce(Outcome) + Send + 'static) {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let busy = Refusal {
            code: Crc::ServerBusy,
            why: "too many logins waiting",
        };
        let Some(tx) = jobs.as_ref() else {
            return reply(Err(busy));
        };
        match tx.try_send((job, Box::new(reply))) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full((_, reply)))
            | Err(mpsc::TrySendError::Disconnected((_, reply))) => {
                tracing::warn!("login refused: {QUEUE} password checks waiting");
                reply(Err(busy));
            }
        }
    }

    /// Stop the verifier threads (they finish the checks they hold).
    pub fn stop(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

const SLOWED: Refusal = Refusal {
    code: Crc::ConnectionRateExceeded,
    why: "too many failed logins from this source",
};

/// The slow part of a login, on a verifier thread: an attempt is taken from the source's
/// bucket (none left: refused unchecked), the hash verified, the attempt given back if
/// the password was right.
fn verify(job: Job, limiter: &Mutex<LoginLimiter>) -> Outcome {
    if !limiter
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .begin(job.source, Instant::now())
    {
        tracing::warn!(user = %job.user, peer = %job.peer, "login refused: {}", SLOWED.why);
        return Err(SLOWED);
    }
    let r = job
        .policy
        .check_password(&job.user, job.password.as_deref());
    let mut l = limiter.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(()) => {
            l.succeeded(job.source);
            Ok((Some(job.user), Verified::Password))
        }
        Err(why) => {
            drop(l);
            tracing::warn!(user = %job.user, peer = %job.peer, "login failed: {why}");
            Err(Refusal {
                code: Crc::BadUserNameOrPassword,
                why,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate(passwords: &str, acl: &str, anonymous: Option<bool>) -> (Arc<Gate>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("passwd");
        std::fs::write(&pw, passwords).unwrap();
        let a = dir.path().join("acl");
        std::fs::write(&a, acl).unwrap();
        let cfg = AuthConfig {
            passwords: Some(pw),
            acl: Some(a),
            allow_anonymous: anonymous,
            limit: LimitConfig {
                burst: 3,
                interval: Duration::from_secs(3600),
                capacity: 100,
            },
            ..Default::default()
        };
        (Gate::start(cfg, 1).unwrap(), dir)
    }

    fn login(user: Option<&str>, pw: Option<&'static [u8]>) -> Login {
        Login {
            username: user.map(Into::into),
            password: pw.map(Bytes::from_static),
            peer: "127.0.0.1:4000".into(),
            ..Default::default()
        }
    }

    /// Run a login to its end.
    fn outcome(g: &Gate, l: Login) -> Outcome {
        match g.start_login(l, Instant::now()) {
            Step::Done(o) => o,
            Step::Verify(job) => {
                let (tx, rx) = mpsc::channel();
                g.submit(job, move |o| tx.send(o).unwrap());
                rx.recv_timeout(Duration::from_secs(10)).unwrap()
            }
        }
    }

    fn code(o: Outcome) -> Option<Crc> {
        o.err().map(|r| r.code)
    }

    #[test]
    fn passwords_users_and_anonymous() {
        let mut p = Passwords::default();
        p.set("alice", b"secret").unwrap();
        let (g, _d) = gate(&p.render(), "", None);
        let ok = outcome(&g, login(Some("alice"), Some(b"secret"))).unwrap();
        assert_eq!((ok.0.as_deref(), ok.1), (Some("alice"), Verified::Password));
        assert_eq!(
            code(outcome(&g, login(Some("alice"), Some(b"nope")))),
            Some(Crc::BadUserNameOrPassword)
        );
        assert_eq!(
            code(outcome(&g, login(Some("mallory"), Some(b"secret")))),
            Some(Crc::BadUserNameOrPassword)
        );
        assert_eq!(
            code(outcome(&g, login(None, None))),
            Some(Crc::NotAuthorized)
        );
        assert_eq!(
            code(outcome(&g, login(None, Some(b"x")))),
            Some(Crc::BadUserNameOrPassword)
        );
        assert_eq!(
            code(outcome(&g, login(Some("alice"), None))),
            Some(Crc::BadUserNameOrPassword)
        );
        // Three password failures used the burst of 3: even the right password waits now.
        assert_eq!(
            code(outcome(&g, login(Some("alice"), Some(b"secret")))),
            Some(Crc::ConnectionRateExceeded)
        );
        assert_eq!(g.slowed(), 1);
        // Another source is not slowed.
        let mut other = login(Some("alice"), Some(b"secret"));
        other.peer = "127.0.0.2:1".into();
        assert!(outcome(&g, other).is_ok());
    }

    #[test]
    fn anonymous_allowed_when_asked_and_certificates_and_peer_uids_stand_for_users() {
        let (g, _d) = gate("", "", Some(true));
        assert_eq!(
            outcome(&g, login(None, None)).unwrap(),
            (None, Verified::None)
        );
        let mut l = login(None, None);
        l.cert_user = Some("alice".into());
        assert_eq!(
            outcome(&g, l).unwrap(),
            (Some("alice".into()), Verified::Certificate)
        );
        let mut g2 = AuthConfig {
            unix_peer_user: true,
            ..Default::default()
        };
        g2.allow_anonymous = Some(false);
        let g2 = Gate::start(g2, 1).unwrap();
        let mut l = login(None, None);
        l.peer_uid = Some(0);
        assert_eq!(
            outcome(&g2, l).unwrap(),
            (Some("root".into()), Verified::PeerCred)
        );
        // Without a password file, a user name is taken as given.
        assert_eq!(
            outcome(&g2, login(Some("bob"), None)).unwrap(),
            (Some("bob".into()), Verified::None)
        );
    }

    #[test]
    fn reload_replaces_the_policy_and_keeps_it_on_a_bad_file() {
        let mut p = Passwords::default();
        p.set("alice", b"a").unwrap();
        let (g, d) = gate(&p.render(), "user alice\ntopic read x\n", None);
        let alice = Identity {
            username: Some("alice".into()),
            verified: Verified::Password,
            ..Default::default()
        };
        assert!(g.policy().read(&alice, "x"));
        std::fs::write(d.path().join("acl"), "user alice\ntopic read y\n").unwrap();
        let fresh = g.reload().unwrap();
        assert!(!fresh.read(&alice, "x") && fresh.read(&alice, "y"));
        std::fs::write(d.path().join("acl"), "bogus\n").unwrap();
        assert!(g.reload().unwrap_err().to_string().contains("line 1"));
        assert!(g.policy().read(&alice, "y"), "the old policy stays");
        // A user removed from the password file is refused on the next look.
        std::fs::write(d.path().join("passwd"), "").unwrap();
        std::fs::write(d.path().join("acl"), "").unwrap();
        let fresh = g.reload().unwrap();
        assert_eq!(fresh.connect(&alice, None), Err(Crc::NotAuthorized));
    }

    #[test]
    fn open_policy_allows_everything() {
        let p = Policy::new(None, None, true);
        let anyone = Identity::default();
        assert!(p.connect(&anyone, None).is_ok());
        assert!(p.publish(&anyone, "$SYS/x") && p.subscribe(&anyone, "#"));
        assert!(p.read(&anyone, "a") && !p.subscribe_filtered(&anyone, "#"));
    }
}
