//! Printing desired objects as multi-document YAML.

use crate::render::DesiredObject;

/// The objects as one YAML stream, `---` before each document, in the given
/// order (render sorts them).
pub fn to_yaml(objects: &[DesiredObject]) -> Result<String, String> {
    let mut out = String::new();
    for obj in objects {
        let doc = serde_saphyr::to_string(&obj.body()).map_err(|e| format!("{}: {e}", obj.key))?;
        out.push_str("---\n");
        out.push_str(&doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}
