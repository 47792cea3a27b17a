//! The HTML listing of a directory without `index.html`: names escaped, links
//! percent-encoded from the names' raw bytes, directories first, sizes in bytes.
//!
//! The directory is read from the descriptor that was opened (and checked to lie beneath
//! the root) for this request, with `fdopendir`, and each entry is looked at with `fstatat`
//! relative to it: no path is resolved again, so a directory swapped for a symlink between
//! the check and the listing cannot make the server list another place.

use super::html_escape;
use super::path::encode;
use nix::sys::stat::{fstatat, SFlag};
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;

/// At most this many entries are listed (the page then says there are more): a directory
/// of a million files would otherwise cost the server a page of ~100 MB and a million
/// `fstatat` per request. Reading stops there too, so the cost of a listing is bounded
/// whatever a local user puts in the directory.
pub const MAX_ENTRIES: usize = 10_000;

/// Render the listing of the directory open as `dir`, shown to the client as `shown`
/// (ending in `/`).
///
/// # Errors
/// Reading the directory failed.
pub fn render(dir: File, shown: &str) -> std::io::Result<String> {
    // `Dir` takes its own descriptor (a dup, sharing the open directory); `dir` stays to
    // look entries up relative to it.
    let mut entries: Vec<(bool, Vec<u8>, u64)> = Vec::new();
    let mut more = false;
    let mut reader = nix::dir::Dir::from_fd(dir.try_clone()?.into())?;
    for entry in reader.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if entries.len() == MAX_ENTRIES {
            more = true;
            break;
        }
        // Not following symlinks: a link is listed as what it is, and says nothing about
        // where it points.
        let stat = fstatat(
            &dir,
            entry.file_name(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        let (is_dir, size) = match stat {
            Ok(st) => (
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR,
                u64::try_from(st.st_size).unwrap_or(0),
            ),
            Err(_) => (false, 0), // vanished meanwhile: listed without a size
        };
        entries.push((is_dir, name.to_vec(), size));
    }
    entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let title = html_escape(shown);
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}</title></head>\n<body><h1>Index of {title}</h1>\n<table>\n<tr><th>Name</th><th>Size</th></tr>\n"
    );
    if shown != "/" {
        html.push_str("<tr><td><a href=\"../\">../</a></td><td></td></tr>\n");
    }
    for (is_dir, name, size) in entries {
        let slash = if is_dir { "/" } else { "" };
        let size = if is_dir {
            String::new()
        } else {
            size.to_string()
        };
        let shown_name = std::ffi::OsStr::from_bytes(&name).to_string_lossy();
        let _ = writeln!(
            html,
            "<tr><td><a href=\"{}{slash}\">{}{slash}</a></td><td>{size}</td></tr>",
            encode(&name),
            html_escape(&shown_name)
        );
    }
    html.push_str("</table>\n");
    if more {
        let _ = writeln!(
            html,
            "<p>More entries not listed: at most {MAX_ENTRIES} are.</p>"
        );
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_directory_is_listed_up_to_the_cap() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..MAX_ENTRIES + 5 {
            File::create(d.path().join(format!("{i}"))).unwrap();
        }
        let html = render(File::open(d.path()).unwrap(), "/big/").unwrap();
        assert_eq!(html.matches("<tr><td><a href=").count(), MAX_ENTRIES + 1);
        assert!(
            html.contains("More entries not listed"),
            "{}",
            &html[html.len() - 200..]
        );
    }
}
