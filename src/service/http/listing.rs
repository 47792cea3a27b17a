//! The HTML listing of a directory without `index.html`: names escaped, links
//! percent-encoded, directories first, sizes in bytes.

use super::html_escape;
use super::path::encode;
use std::fmt::Write as _;
use std::path::Path;

/// Render the listing of `dir`, shown to the client as `shown` (ending in `/`).
///
/// # Errors
/// Reading the directory failed.
pub fn render(dir: &Path, shown: &str) -> std::io::Result<String> {
    let mut entries: Vec<(bool, String, u64)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = e.metadata();
        let is_dir = meta.as_ref().is_ok_and(|m| m.is_dir());
        let size = meta.map_or(0, |m| m.len());
        entries.push((is_dir, name, size));
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
        let _ = writeln!(
            html,
            "<tr><td><a href=\"{}{slash}\">{}{slash}</a></td><td>{size}</td></tr>",
            encode(&name),
            html_escape(&name)
        );
    }
    html.push_str("</table>\n</body></html>\n");
    Ok(html)
}
