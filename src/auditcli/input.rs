//! Reading audit logs line by line, in bounded memory, and following one as
//! it grows and is rotated.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Longer lines are reported and skipped without being held in memory (a
/// real record is well under a kilobyte; its free-text `detail` is short).
pub const MAX_LINE: usize = 1 << 20;
const READ_BUFFER: usize = 64 * 1024;

/// What [`Lines::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// One line, without its newline.
    Line(&'a [u8]),
    /// A line longer than [`MAX_LINE`], skipped.
    TooLong,
}

impl Item<'_> {
    /// The line (empty for one too long).
    pub fn line(&self) -> &[u8] {
        match self {
            Item::Line(l) => l,
            Item::TooLong => &[],
        }
    }
}

/// Lines of a byte stream, each at most [`MAX_LINE`] bytes.
pub struct Lines<R> {
    inner: BufReader<R>,
    /// The line being assembled (it may span several reads).
    line: Vec<u8>,
    too_long: bool,
    /// `line` was handed out and is to be cleared before the next one.
    returned: bool,
    /// Bytes taken from `inner` so far: the offset in a file read from 0.
    consumed: u64,
    /// Lines returned so far.
    number: u64,
}

impl<R: Read> Lines<R> {
    pub fn new(inner: R) -> Lines<R> {
        Lines {
            inner: BufReader::with_capacity(READ_BUFFER, inner),
            line: Vec::new(),
            too_long: false,
            returned: false,
            consumed: 0,
            number: 0,
        }
    }

    /// The next line and its number; `None` at the end of what is there now. An
    /// unterminated last line is returned when `eof_ends_line` (the file
    /// is complete) and otherwise kept until its newline arrives (a
    /// followed file that a writer is still appending to).
    pub fn next(&mut self, eof_ends_line: bool) -> io::Result<Option<(u64, Item<'_>)>> {
        if std::mem::take(&mut self.returned) {
            self.line.clear();
            // Kept for the next line's allocation, unless one long line
            // grew it far past what lines usually need.
            if self.line.capacity() > 4 * READ_BUFFER {
                self.line.shrink_to(READ_BUFFER);
            }
        }
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                let pending = !self.line.is_empty() || self.too_long;
                return Ok(if pending && eof_ends_line { Some(self.take()) } else { None });
            }
            let (chunk, used, complete) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            if !self.too_long {
                if self.line.len() + chunk.len() > MAX_LINE {
                    self.too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            self.inner.consume(used);
            self.consumed += used as u64;
            if complete {
                return Ok(Some(self.take()));
            }
        }
    }

    fn take(&mut self) -> (u64, Item<'_>) {
        self.number += 1;
        self.returned = true;
        if std::mem::take(&mut self.too_long) {
            return (self.number, Item::TooLong);
        }
        (self.number, Item::Line(&self.line))
    }

    /// Whether the next line can be had without reading (so without
    /// blocking on a pipe): the moment to flush output to a live reader.
    pub fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }
}

/// A file being followed: read to its end, then re-checked on every poll
/// for growth, truncation and replacement.
pub struct Followed {
    pub path: PathBuf,
    pub lines: Lines<File>,
    /// Device and inode of the open file: a different pair at `path` means
    /// the log was rotated by rename and a new one created.
    id: (u64, u64),
}

/// What [`Followed::check`] found at the path.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Same file (perhaps grown), or no file there yet after a rename.
    None,
    /// Shorter than what was read: truncated in place (`copytruncate`).
    Truncated,
    /// Another file now has the name.
    Replaced,
}

impl Followed {
    pub fn open(path: &Path) -> io::Result<Followed> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"));
        }
        Ok(Followed { path: path.to_owned(), lines: Lines::new(file), id: (meta.dev(), meta.ino()) })
    }

    /// Compares the path with the open file. Call after reading to the end
    /// (a truncation is judged against what was read).
    pub fn check(&self) -> Change {
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) != self.id => Change::Replaced,
            Ok(m) if m.len() < self.lines.consumed => Change::Truncated,
            // Gone (renamed away, its successor not yet created) or
            // unreadable for a moment: keep reading the open file.
            _ => Change::None,
        }
    }

    /// Starts over at the beginning of the same file.
    pub fn rewind(&mut self) -> io::Result<()> {
        self.lines.inner.seek(SeekFrom::Start(0))?;
        self.lines.consumed = 0;
        self.lines.number = 0;
        self.lines.line.clear();
        self.lines.too_long = false;
        self.lines.returned = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines, or `Err` for a line too long.
    type Got = Vec<Result<String, ()>>;

    fn collect(input: &[u8], eof_ends_line: bool) -> Got {
        let mut lines = Lines::new(input);
        let mut out = Vec::new();
        while let Some((_, item)) = lines.next(eof_ends_line).unwrap() {
            out.push(match item {
                Item::Line(l) => Ok(String::from_utf8_lossy(l).into_owned()),
                Item::TooLong => Err(()),
            });
        }
        out
    }

    #[test]
    fn lines_table() {
        let long = "x".repeat(MAX_LINE + 1);
        let just = "y".repeat(MAX_LINE);
        let cases: Vec<(String, bool, Got)> = vec![
            ("".into(), true, vec![]),
            ("a\nb\n".into(), true, vec![Ok("a".into()), Ok("b".into())]),
            ("a\nb".into(), true, vec![Ok("a".into()), Ok("b".into())]),
            // A followed file's unfinished line waits for its newline.
            ("a\nb".into(), false, vec![Ok("a".into())]),
            ("\n\n".into(), true, vec![Ok("".into()), Ok("".into())]),
            ("a\r\n".into(), true, vec![Ok("a\r".into())]),
            (format!("{long}\nc\n"), true, vec![Err(()), Ok("c".into())]),
            (format!("c\n{long}"), true, vec![Ok("c".into()), Err(())]),
            (format!("{just}\n"), true, vec![Ok(just.clone())]),
        ];
        for (input, eof, want) in cases {
            let got = collect(input.as_bytes(), eof);
            assert_eq!(got.len(), want.len(), "{:?}", &input[..input.len().min(20)]);
            assert!(got == want, "{:?}", &input[..input.len().min(20)]);
        }
    }

    #[test]
    fn numbers_and_offsets_follow_the_input() {
        let mut lines = Lines::new(&b"one\ntwo\nthr"[..]);
        assert_eq!(lines.next(false).unwrap(), Some((1, Item::Line(b"one"))));
        assert_eq!(lines.next(false).unwrap(), Some((2, Item::Line(b"two"))));
        assert_eq!(lines.next(false).unwrap(), None);
        assert_eq!(lines.consumed, 11);
        assert_eq!(lines.next(true).unwrap(), Some((3, Item::Line(b"thr"))));
    }

    #[test]
    fn follow_sees_growth_truncation_and_replacement() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "first\nsecond\n").unwrap();
        let mut f = Followed::open(&path).unwrap();
        let read_all = |f: &mut Followed| {
            let mut got = Vec::new();
            while let Some((_, Item::Line(l))) = f.lines.next(false).unwrap() {
                got.push(String::from_utf8(l.to_vec()).unwrap());
            }
            got
        };
        assert_eq!(read_all(&mut f), ["first", "second"]);
        assert_eq!(f.check(), Change::None);

        let mut w = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        w.write_all(b"thi").unwrap();
        assert!(read_all(&mut f).is_empty(), "half a line is not a line yet");
        w.write_all(b"rd\n").unwrap();
        assert_eq!(read_all(&mut f), ["third"]);

        std::fs::File::create(&path).unwrap().write_all(b"new\n").unwrap();
        assert_eq!(f.check(), Change::Truncated);
        f.rewind().unwrap();
        assert_eq!(read_all(&mut f), ["new"]);
        assert_eq!(f.lines.number, 1);

        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        assert_eq!(f.check(), Change::None, "no successor yet: keep the old file");
        std::fs::write(&path, "fresh\n").unwrap();
        assert_eq!(f.check(), Change::Replaced);
    }
}
