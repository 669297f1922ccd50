//! Cutting a live byte stream into blocks, with sync points where a decoder
//! can start.
//!
//! For MPEG-TS input a block starts at every video random-access point (a
//! packet whose adaptation field sets `random_access_indicator` and which
//! starts a video PES, stream id 0xE0..=0xEF), together with the PAT and
//! PMT packets right before it, and is marked as a sync point: a viewer that
//! joins mid-stream starts there, so its decoder gets the tables and then a
//! key frame. ffmpeg's TS muxer writes PAT and PMT before every key frame.
//! Until such a packet is seen, and for any other input, a block is a sync
//! point when at least a second has passed since the last one.
//!
//! Blocks are also cut at the block size (whole TS packets), and the caller
//! flushes a partial block when its first byte has waited long enough.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};

use super::TS_PACKET;

/// Sync points by time, for input without random-access marks.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// One block to publish.
#[derive(Debug)]
pub struct Cut {
    pub data: Bytes,
    /// A decoder can start at its first byte.
    pub sync: bool,
    /// When its first byte arrived.
    pub taken: Instant,
}

/// Gathers bytes as they arrive and cuts them into [`Cut`]s. PURE: the
/// caller passes the time.
pub struct Blocker {
    block_size: usize,
    pending: BytesMut,
    /// Start offset in `pending` of each chunk pushed, with its arrival.
    arrivals: VecDeque<(usize, Instant)>,
    /// `None` until three packets (or a flush) tell.
    ts: Option<bool>,
    /// Offset in `pending` of the next TS packet to look at.
    scan: usize,
    /// Start of the run of PAT/PMT packets just before `scan`.
    psi_run: Option<usize>,
    pmt_pid: Option<u16>,
    /// A random-access point was seen: sync points come from them alone.
    rai_seen: bool,
    /// `pending` starts at a random-access point.
    pending_sync: bool,
    last_sync: Option<Instant>,
}

impl Blocker {
    pub fn new(block_size: usize) -> Self {
        Blocker {
            block_size: block_size.max(1),
            pending: BytesMut::new(),
            arrivals: VecDeque::new(),
            ts: None,
            scan: 0,
            psi_run: None,
            pmt_pid: None,
            rai_seen: false,
            pending_sync: false,
            last_sync: None,
        }
    }

    /// When the oldest byte not yet cut arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.arrivals.front().map(|a| a.1)
    }

    /// Adds `bytes` that arrived at `now`; full blocks go to `out`.
    pub fn push(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Cut>) {
        if bytes.is_empty() {
            return;
        }
        self.arrivals.push_back((self.pending.len(), now));
        self.pending.extend_from_slice(bytes);
        if self.ts.is_none() && self.pending.len() >= 3 * TS_PACKET {
            self.detect();
        }
        self.cut(out);
    }

    /// Cuts what is pending now: in a TS stream the whole packets (all of
    /// it when there is not one), otherwise everything.
    pub fn flush(&mut self, out: &mut Vec<Cut>) {
        if self.ts.is_none() {
            self.detect();
            self.cut(out);
        }
        let take = match self.ts {
            Some(true) if self.scan > 0 => self.scan,
            _ => self.pending.len(),
        };
        if take > 0 {
            out.push(self.split(take));
        }
    }

    /// Everything still pending, at the end of the input.
    pub fn finish(&mut self, out: &mut Vec<Cut>) {
        self.flush(out);
        if !self.pending.is_empty() {
            let n = self.pending.len();
            out.push(self.split(n));
        }
    }

    fn detect(&mut self) {
        let p = &self.pending;
        let packets = p.len() / TS_PACKET;
        self.ts = Some(packets > 0 && (0..packets.min(3)).all(|i| p[i * TS_PACKET] == 0x47));
    }

    fn cut(&mut self, out: &mut Vec<Cut>) {
        if self.ts == Some(true) {
            let limit = (self.block_size / TS_PACKET).max(1) * TS_PACKET;
            while self.scan + TS_PACKET <= self.pending.len() {
                let o = self.scan;
                let pkt = &self.pending[o..o + TS_PACKET];
                if pkt[0] != 0x47 {
                    // Lost packet alignment: from here on, a plain byte stream.
                    self.ts = Some(false);
                    break;
                }
                let pid = u16::from(pkt[1] & 0x1f) << 8 | u16::from(pkt[2]);
                if pid == 0 {
                    self.pmt_pid = pat_first_pmt(pkt).or(self.pmt_pid);
                }
                if video_random_access(pkt) {
                    let at = self.psi_run.unwrap_or(o);
                    if at > 0 {
                        out.push(self.split(at));
                    }
                    self.rai_seen = true;
                    self.pending_sync = true;
                    self.psi_run = None;
                } else if pid == 0 || Some(pid) == self.pmt_pid {
                    self.psi_run.get_or_insert(o);
                } else {
                    self.psi_run = None;
                }
                self.scan += TS_PACKET;
                if self.scan >= limit {
                    // Tables at the end go with what follows them.
                    let at = self.psi_run.filter(|&r| r > 0).unwrap_or(self.scan);
                    out.push(self.split(at));
                }
            }
        }
        if self.ts == Some(false) {
            while self.pending.len() >= self.block_size {
                out.push(self.split(self.block_size));
            }
        }
    }

    /// The first `at` pending bytes as a block.
    fn split(&mut self, at: usize) -> Cut {
        let taken = self.oldest().expect("split with bytes pending");
        let data = self.pending.split_to(at).freeze();
        let sync = if self.rai_seen {
            std::mem::take(&mut self.pending_sync)
        } else {
            let due = self
                .last_sync
                .is_none_or(|t| taken.saturating_duration_since(t) >= SYNC_EVERY);
            if due {
                self.last_sync = Some(taken);
            }
            due
        };
        while self.arrivals.len() > 1 && self.arrivals[1].0 <= at {
            self.arrivals.pop_front();
        }
        if self.pending.is_empty() {
            self.arrivals.clear();
        }
        for a in &mut self.arrivals {
            a.0 = a.0.saturating_sub(at);
        }
        self.scan = self.scan.saturating_sub(at);
        self.psi_run = self.psi_run.and_then(|r| r.checked_sub(at));
        Cut { data, sync, taken }
    }
}

/// Whether a TS packet starts a video PES at a random-access point.
fn video_random_access(pkt: &[u8]) -> bool {
    let pusi = pkt[1] & 0x40 != 0;
    let afc = (pkt[3] >> 4) & 0x3;
    if !pusi || afc != 3 {
        return false;
    }
    let len = usize::from(pkt[4]);
    if len == 0 || pkt[5] & 0x40 == 0 {
        return false;
    }
    let payload = 5 + len;
    pkt.len() >= payload + 4
        && pkt[payload..payload + 3] == [0, 0, 1]
        && (0xE0..=0xEF).contains(&pkt[payload + 3])
}

/// The PID of the first program's PMT in a PAT packet, if it is whole here.
fn pat_first_pmt(pkt: &[u8]) -> Option<u16> {
    if pkt[1] & 0x40 == 0 {
        return None;
    }
    let afc = (pkt[3] >> 4) & 0x3;
    let mut i = match afc {
        1 => 4,
        3 => 5 + usize::from(pkt[4]),
        _ => return None,
    };
    i += 1 + usize::from(*pkt.get(i)?); // pointer field
                                        // table_id, section_length (2), ts_id (2), version (1), section (2)
    if *pkt.get(i)? != 0 {
        return None;
    }
    let section_len = usize::from(pkt.get(i + 1)? & 0x0f) << 8 | usize::from(*pkt.get(i + 2)?);
    let mut e = i + 8;
    let end = (i + 3 + section_len).saturating_sub(4).min(pkt.len()); // before the CRC
    while e + 4 <= end {
        let program = u16::from(pkt[e]) << 8 | u16::from(pkt[e + 1]);
        let pid = u16::from(pkt[e + 2] & 0x1f) << 8 | u16::from(pkt[e + 3]);
        if program != 0 {
            return Some(pid);
        }
        e += 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PMT: u16 = 0x1000;

    fn packet(pid: u16, rai_video: bool, fill: u8) -> Vec<u8> {
        let mut p = vec![0x47, (pid >> 8) as u8 & 0x1f, pid as u8, 0x10];
        if rai_video {
            p[1] |= 0x40;
            p[3] = 0x30;
            p.extend_from_slice(&[1, 0x40, 0, 0, 1, 0xE0]);
        } else if pid == 0 {
            p[1] |= 0x40;
            // pointer, table 0, length 13, ts id, version, sections, program 1 -> PMT
            p.extend_from_slice(&[
                0,
                0,
                0xB0,
                13,
                0,
                1,
                0xC1,
                0,
                0,
                0,
                1,
                0xE0 | (PMT >> 8) as u8,
            ]);
            p.push(PMT as u8);
            p.extend_from_slice(&[0, 0, 0, 0]);
        }
        p.resize(TS_PACKET, fill);
        p
    }

    /// A second of stream: PAT, PMT, a key frame, then `rest` packets of
    /// video and audio.
    fn gop(rest: usize) -> Vec<u8> {
        let mut s = packet(0, false, 0);
        s.extend(packet(PMT, false, 1));
        s.extend(packet(0x100, true, 2));
        for i in 0..rest {
            s.extend(packet(if i % 3 == 0 { 0x101 } else { 0x100 }, false, 3));
        }
        s
    }

    #[test]
    fn blocks_start_at_the_tables_before_each_key_frame() {
        let t0 = Instant::now();
        let mut b = Blocker::new(188 * 112);
        let mut out = Vec::new();
        // Start mid-GOP: 10 packets of video, then two GOPs, fed in odd chunks.
        let mut stream: Vec<u8> = (0..10).flat_map(|_| packet(0x100, false, 9)).collect();
        stream.extend(gop(150));
        stream.extend(gop(40));
        for (i, chunk) in stream.chunks(1000).enumerate() {
            b.push(chunk, t0 + Duration::from_millis(i as u64), &mut out);
        }
        b.finish(&mut out);
        let joined: Vec<u8> = out.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(joined, stream, "every byte once, in order");
        let sizes: Vec<(usize, bool)> = out.iter().map(|c| (c.data.len() / 188, c.sync)).collect();
        // 10 before the first key frame (a time mark: the first block);
        // then 3 + 150 = 153 packets cut at 112, the rest up to the next
        // tables; then 43.
        assert_eq!(
            sizes,
            vec![(10, true), (112, true), (41, false), (43, true)]
        );
        for c in out.iter().filter(|c| c.sync).skip(1) {
            assert_eq!(&c.data[..4], &packet(0, false, 0)[..4], "starts at the PAT");
        }
        // Each block is stamped with its first byte's arrival.
        assert_eq!(out[1].taken, t0 + Duration::from_millis(1));
    }

    #[test]
    fn other_input_is_cut_at_the_block_size_and_synced_by_time() {
        let t0 = Instant::now();
        let mut b = Blocker::new(1000);
        let mut out = Vec::new();
        for i in 0..30u64 {
            b.push(&[7u8; 500], t0 + Duration::from_millis(100 * i), &mut out);
        }
        assert_eq!(out.len(), 15);
        let syncs: Vec<bool> = out.iter().map(|c| c.sync).collect();
        // One a second: every fifth block of 200 ms.
        assert_eq!(syncs.iter().filter(|s| **s).count(), 3, "{syncs:?}");
        assert!(syncs[0] && syncs[5] && syncs[10]);
        // A partial block is flushed whole.
        b.push(&[1u8; 10], t0 + Duration::from_secs(4), &mut out);
        assert_eq!(b.oldest(), Some(t0 + Duration::from_secs(4)));
        b.flush(&mut out);
        assert_eq!(out.last().unwrap().data.len(), 10);
        assert_eq!(b.oldest(), None);
    }
}
