//! Persistence behind the broker: the changes the core reports ([`StoreOp`]) committed to
//! an embedded database, and read back at start-up.
//!
//! The database is [redb](https://docs.rs/redb): a single file of copy-on-write B-trees,
//! ACID transactions whose commit returns only once the data is on disk (fsync), pure Rust,
//! few dependencies. A broker's writes are small and must be durable *before* an
//! acknowledgement goes out, so what matters is the cost of one durable commit and how many
//! changes it carries: the server batches every change made while the previous commit was
//! running into the next one (group commit), so the fsync cost is shared by all the messages
//! of that batch.
//!
//! Tables: `sessions` (client id → expiry, version, subscriptions), `queue` ((client id,
//! sequence) → a message queued or in flight for that session, with its packet identifier
//! once sent and whether PUBREL was sent), `retained` (topic → message), `rx_qos2`
//! ((client id, packet id) → QoS 2 publications received and not yet released).

use super::codec::{Message, MessageProps};
use super::topic::SubOpts;
use bytes::Bytes;
use mqtt_proto::QoS;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
const QUEUE: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("queue");
const RETAINED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("retained");
const RX_QOS2: TableDefinition<'_, (&str, u16), u8> = TableDefinition::new("rx_qos2");

/// A persistent session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Client identifier.
    pub client: Arc<str>,
    /// Session expiry interval, seconds (`u32::MAX`: never).
    pub expiry: u32,
    /// Whether it spoke 5.0.
    pub v5: bool,
    /// Its subscriptions.
    pub subs: Vec<(Arc<str>, SubOpts)>,
    /// Since when it has been without a connection (`None`: connected). Its expiry and a
    /// delayed will count from then, across restarts.
    pub offline_since: Option<Instant>,
    /// Its will and will delay: sent if the connection ends without DISCONNECT (a crash of
    /// the server included), or pending if that already happened and the delay runs.
    pub will: Option<(Message, u32)>,
}

/// A message queued or in flight for a persistent session.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMsg {
    /// Client identifier.
    pub client: Arc<str>,
    /// Order within the session.
    pub seq: u64,
    /// The message.
    pub msg: Message,
    /// QoS of the delivery.
    pub qos: u8,
    /// RETAIN flag of the delivery.
    pub retain: bool,
    /// Subscription identifiers.
    pub sub_ids: Vec<u32>,
    /// Packet identifier once sent (0: not yet).
    pub pid: u16,
    /// PUBREL sent (QoS 2).
    pub released: bool,
}

/// One change to persist.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Create or replace a session record.
    Session(Record),
    /// Delete a session with its queue and QoS 2 state.
    DropSession(Arc<str>),
    /// Queue a message for a session.
    Queue(StoredMsg),
    /// A queued message was sent with this packet identifier (and PUBREL sent, if true).
    Flight(Arc<str>, u64, u16, bool),
    /// A queued message is done (acknowledged, or expired).
    Unqueue(Arc<str>, u64),
    /// Set (`Some`) or clear the retained message of a topic.
    Retain(Arc<str>, Option<Message>),
    /// A QoS 2 packet identifier received (`true`) or released.
    RxQos2(Arc<str>, u16, bool),
}

/// What the store held at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Sessions.
    pub sessions: Vec<Record>,
    /// Queued and in-flight messages.
    pub queued: Vec<StoredMsg>,
    /// Retained messages.
    pub retained: Vec<Message>,
    /// QoS 2 identifiers awaiting PUBREL.
    pub rx_qos2: Vec<(Arc<str>, u16)>,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[error("bus store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// The database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

// --- a small binary encoding ---

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

fn put_opt(b: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            b.push(1);
            put_bytes(b, v);
        }
        None => b.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError("truncated record".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(((self.u32()? as u64) << 32) | self.u32()? as u64)
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn text(&mut self) -> Result<Arc<str>, StoreError> {
        std::str::from_utf8(self.bytes()?)
            .map(Arc::from)
            .map_err(|_| StoreError("bad UTF-8 in record".into()))
    }
    fn opt(&mut self) -> Result<Option<&'a [u8]>, StoreError> {
        Ok(if self.u8()? == 1 {
            Some(self.bytes()?)
        } else {
            None
        })
    }
    fn opt_text(&mut self) -> Result<Option<Arc<str>>, StoreError> {
        self.opt()?
            .map(|b| {
                std::str::from_utf8(b)
                    .map(Arc::from)
                    .map_err(|_| StoreError("bad UTF-8 in record".into()))
            })
            .transpose()
    }
}

fn wall_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn encode_msg(b: &mut Vec<u8>, m: &Message) {
    put_bytes(b, m.topic.as_bytes());
    put_bytes(b, &m.payload);
    b.push(m.qos as u8);
    b.push(m.retain as u8);
    let p = &m.props;
    b.push(match p.payload_utf8 {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
    // Expiry as a wall-clock deadline, so time spent down counts.
    let deadline = m.expires.map(to_wall);
    b.extend_from_slice(&deadline.unwrap_or(0).to_be_bytes());
    put_u32(b, p.expiry.unwrap_or(0));
    put_opt(b, p.content_type.as_deref().map(str::as_bytes));
    put_opt(b, p.response_topic.as_deref().map(str::as_bytes));
    put_opt(b, p.correlation.as_deref());
    put_u32(b, p.user.len() as u32);
    for (k, v) in &p.user {
        put_bytes(b, k.as_bytes());
        put_bytes(b, v.as_bytes());
    }
}

fn decode_msg(r: &mut Reader<'_>) -> Result<Message, StoreError> {
    let topic = r.text()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let qos = QoS::from_u8(r.u8()?).map_err(err)?;
    let retain = r.u8()? == 1;
    let payload_utf8 = match r.u8()? {
        0 => None,
        1 => Some(false),
        _ => Some(true),
    };
    let deadline = r.u64()?;
    let expiry = r.u32()?;
    let content_type = r.opt_text()?;
    let response_topic = r.opt_text()?;
    let correlation = r.opt()?.map(Bytes::copy_from_slice);
    let n = r.u32()? as usize;
    let mut user = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        user.push((r.text()?, r.text()?));
    }
    let expires = (deadline != 0).then(|| from_wall(deadline));
    Ok(Message {
        topic,
        payload,
        qos,
        retain,
        props: MessageProps {
            payload_utf8,
            expiry: (expiry != 0).then_some(expiry),
            content_type,
            response_topic,
            correlation,
            user,
        },
        expires,
    })
}

fn encode_queued(q: &StoredMsg) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + q.msg.payload.len());
    b.extend_from_slice(&q.pid.to_be_bytes());
    b.push(q.released as u8);
    b.push(q.qos);
    b.push(q.retain as u8);
    put_u32(&mut b, q.sub_ids.len() as u32);
    for id in &q.sub_ids {
        put_u32(&mut b, *id);
    }
    encode_msg(&mut b, &q.msg);
    b
}

fn decode_queued(client: Arc<str>, seq: u64, data: &[u8]) -> Result<StoredMsg, StoreError> {
    let mut r = Reader(data);
    let pid = u16::from_be_bytes([r.u8()?, r.u8()?]);
    let released = r.u8()? == 1;
    let qos = r.u8()?;
    let retain = r.u8()? == 1;
    let n = r.u32()? as usize;
    let mut sub_ids = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        sub_ids.push(r.u32()?);
    }
    let msg = decode_msg(&mut r)?;
    Ok(StoredMsg {
        client,
        seq,
        msg,
        qos,
        retain,
        sub_ids,
        pid,
        released,
    })
}

/// An instant as wall-clock seconds (so that time spent down counts), and back.
fn to_wall(t: Instant) -> u64 {
    let now = Instant::now();
    match t.checked_duration_since(now) {
        Some(ahead) => wall_secs() + ahead.as_secs(),
        None => wall_secs().saturating_sub(now.duration_since(t).as_secs()),
    }
}

fn from_wall(secs: u64) -> Instant {
    let now = Instant::now();
    let wall = wall_secs();
    if secs >= wall {
        now + Duration::from_secs(secs - wall)
    } else {
        now.checked_sub(Duration::from_secs(wall - secs))
            .unwrap_or(now)
    }
}

fn encode_record(rec: &Record) -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, rec.expiry);
    b.push(rec.v5 as u8);
    put_u32(&mut b, rec.subs.len() as u32);
    for (f, o) in &rec.subs {
        put_bytes(&mut b, f.as_bytes());
        b.push(o.qos);
        b.push(o.no_local as u8);
        b.push(o.retain_as_published as u8);
        b.push(o.retain_handling);
        put_u32(&mut b, o.id.unwrap_or(0));
    }
    // Added later: older records end here (read as connected, no will).
    b.extend_from_slice(&rec.offline_since.map_or(0, to_wall).to_be_bytes());
    match &rec.will {
        Some((m, delay)) => {
            b.push(1);
            put_u32(&mut b, *delay);
            encode_msg(&mut b, m);
        }
        None => b.push(0),
    }
    b
}

fn decode_record(client: Arc<str>, data: &[u8]) -> Result<Record, StoreError> {
    let mut r = Reader(data);
    let expiry = r.u32()?;
    let v5 = r.u8()? == 1;
    let n = r.u32()? as usize;
    let mut subs = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let f = r.text()?;
        let o = SubOpts {
            qos: r.u8()?,
            no_local: r.u8()? == 1,
            retain_as_published: r.u8()? == 1,
            retain_handling: r.u8()?,
            id: Some(r.u32()?).filter(|&i| i != 0),
        };
        subs.push((f, o));
    }
    let mut offline_since = None;
    let mut will = None;
    if !r.0.is_empty() {
        offline_since = Some(r.u64()?).filter(|&s| s != 0).map(from_wall);
        if r.u8()? == 1 {
            let delay = r.u32()?;
            will = Some((decode_msg(&mut r)?, delay));
        }
    }
    Ok(Record {
        client,
        expiry,
        v5,
        subs,
        offline_since,
        will,
    })
}

impl Store {
    /// Open (or create) the database in `dir`, and read back what it holds.
    ///
    /// # Errors
    /// The directory or database cannot be opened, or a record is unreadable.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("bus.redb")).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        {
            tx.open_table(SESSIONS).map_err(err)?;
            tx.open_table(QUEUE).map_err(err)?;
            tx.open_table(RETAINED).map_err(err)?;
            tx.open_table(RX_QOS2).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let mut loaded = Loaded::default();
        let rx = db.begin_read().map_err(err)?;
        for row in rx.open_table(SESSIONS).map_err(err)?.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            loaded
                .sessions
                .push(decode_record(k.value().into(), v.value())?);
        }
        for row in rx.open_table(QUEUE).map_err(err)?.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (client, seq) = k.value();
            loaded
                .queued
                .push(decode_queued(client.into(), seq, v.value())?);
        }
        for row in rx.open_table(RETAINED).map_err(err)?.iter().map_err(err)? {
            let (_, v) = row.map_err(err)?;
            loaded.retained.push(decode_msg(&mut Reader(v.value()))?);
        }
        for row in rx.open_table(RX_QOS2).map_err(err)?.iter().map_err(err)? {
            let (k, _) = row.map_err(err)?;
            let (client, pid) = k.value();
            loaded.rx_qos2.push((client.into(), pid));
        }
        Ok((Store { db }, loaded))
    }

    /// Apply `ops` in one durable transaction: when this returns `Ok`, they are on disk.
    ///
    /// # Errors
    /// Any database error (nothing of the batch is then committed).
    pub fn commit(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut sessions = tx.open_table(SESSIONS).map_err(err)?;
            let mut queue = tx.open_table(QUEUE).map_err(err)?;
            let mut retained = tx.open_table(RETAINED).map_err(err)?;
            let mut rx = tx.open_table(RX_QOS2).map_err(err)?;
            for op in ops {
                match op {
                    StoreOp::Session(rec) => {
                        sessions
                            .insert(&*rec.client, &encode_record(rec)[..])
                            .map_err(err)?;
                    }
                    StoreOp::DropSession(c) => {
                        sessions.remove(&**c).map_err(err)?;
                        let c: &str = c;
                        queue
                            .retain_in((c, 0u64)..=(c, u64::MAX), |_, _| false)
                            .map_err(err)?;
                        rx.retain_in((c, 0u16)..=(c, u16::MAX), |_, _| false)
                            .map_err(err)?;
                    }
                    StoreOp::Queue(q) => {
                        queue
                            .insert((&*q.client, q.seq), &encode_queued(q)[..])
                            .map_err(err)?;
                    }
                    StoreOp::Flight(c, seq, pid, released) => {
                        let cur = queue
                            .get((&**c, *seq))
                            .map_err(err)?
                            .map(|v| v.value().to_vec());
                        if let Some(mut v) = cur {
                            v[..2].copy_from_slice(&pid.to_be_bytes());
                            v[2] = *released as u8;
                            queue.insert((&**c, *seq), &v[..]).map_err(err)?;
                        }
                    }
                    StoreOp::Unqueue(c, seq) => {
                        queue.remove((&**c, *seq)).map_err(err)?;
                    }
                    StoreOp::Retain(t, Some(m)) => {
                        let mut b = Vec::new();
                        encode_msg(&mut b, m);
                        retained.insert(&**t, &b[..]).map_err(err)?;
                    }
                    StoreOp::Retain(t, None) => {
                        retained.remove(&**t).map_err(err)?;
                    }
                    StoreOp::RxQos2(c, pid, true) => {
                        rx.insert((&**c, *pid), 1u8).map_err(err)?;
                    }
                    StoreOp::RxQos2(c, pid, false) => {
                        rx.remove((&**c, *pid)).map_err(err)?;
                    }
                }
            }
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.sessions.is_empty());
        let msg = Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::Level1,
            retain: false,
            props: MessageProps {
                response_topic: Some("r".into()),
                user: vec![("k".into(), "v".into())],
                ..Default::default()
            },
            expires: None,
        };
        let q = |seq| StoredMsg {
            client: "c".into(),
            seq,
            msg: msg.clone(),
            qos: 1,
            retain: false,
            sub_ids: vec![7],
            pid: 0,
            released: false,
        };
        let opts = SubOpts {
            qos: 1,
            no_local: true,
            retain_as_published: false,
            retain_handling: 2,
            id: Some(7),
        };
        store
            .commit(&[
                StoreOp::Session(Record {
                    client: "c".into(),
                    expiry: 60,
                    v5: true,
                    subs: vec![("t".into(), opts)],
                    offline_since: Some(Instant::now() - Duration::from_secs(30)),
                    will: Some((msg.clone(), 20)),
                }),
                StoreOp::Queue(q(1)),
                StoreOp::Queue(q(2)),
                StoreOp::Flight("c".into(), 1, 5, true),
                StoreOp::Unqueue("c".into(), 2),
                StoreOp::Retain("t".into(), Some(msg.clone())),
                StoreOp::RxQos2("c".into(), 9, true),
            ])
            .unwrap();
        drop(store);
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.sessions[0].subs[0].1, opts);
        let since = loaded.sessions[0].offline_since.expect("offline");
        let ago = since.elapsed().as_secs();
        assert!((29..=31).contains(&ago), "offline for {ago} s, not 30");
        assert_eq!(loaded.sessions[0].will, Some((msg.clone(), 20)));
        assert_eq!(loaded.queued.len(), 1);
        assert_eq!((loaded.queued[0].pid, loaded.queued[0].released), (5, true));
        assert_eq!(loaded.queued[0].msg, msg);
        assert_eq!(loaded.retained, vec![msg]);
        assert_eq!(loaded.rx_qos2, vec![("c".into(), 9)]);
        store.commit(&[StoreOp::DropSession("c".into())]).unwrap();
        drop(store);
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert!(
            loaded.sessions.is_empty() && loaded.queued.is_empty() && loaded.rx_qos2.is_empty()
        );
    }
}
