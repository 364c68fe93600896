//! The `command` kind: a shell command with declared inputs, dependency files and outputs, for
//! data preparation. Its `cmd` is a minijinja template over `inputs.NAME` and `out`.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Expect, FieldError, InputField, Kind, Produces, StageSpec, inputs_list, stage_common};
use crate::source::ValuePath;

/// The instructions (and, at about 64 bytes each, the memory) a `cmd` template may use.
const COMMAND_TEMPLATE_FUEL: u64 = 1_000_000;

/// Run a shell command that writes declared files into `{{ out }}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct CommandParams {
    /// Nodes the command reads; `{{ inputs.NAME }}` is a dataset's file, a model's directory, or
    /// a stage's artifact directory (or the output file for `stage.output`).
    pub inputs: Vec<String>,
    /// Plain files or directories the command depends on, relative to the recipe; hashed by
    /// content.
    pub deps: Vec<String>,
    /// The command, run by `sh -c` in the recipe's directory.
    pub cmd: String,
    /// Files the command must create in `{{ out }}`: `name = "relative/path"`; downstream
    /// stages reference them as `STAGE.name`.
    pub outputs: BTreeMap<String, String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Confine the command (Linux, Landlock): it reads only its inputs, `deps`, `read_paths`
    /// and the system's read-only locations, and writes only `{{ out }}`, its work directory
    /// and `$TMPDIR`. `"recipe-dir"` also lets it read the recipe's directory; `false` opts out,
    /// and the artifact's manifest says so. Not in the key: it restricts, it adds nothing.
    #[serde(skip_serializing_if = "SandboxSetting::is_default")]
    pub sandbox: SandboxSetting,
    /// More paths the sandboxed command may read, relative to the recipe or absolute. Files
    /// among them are hashed into the key like `deps`; directories are only allowed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub read_paths: Vec<String>,
    /// Allow TCP connections from inside the sandbox (off by default, where the kernel can
    /// enforce it: Linux 6.7 and later).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
}

/// `sandbox = true | false | "recipe-dir"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum SandboxSetting {
    /// `true` (the default) confines the command; `false` does not.
    Enabled(bool),
    /// `"recipe-dir"`: confined, but it may read anything under the recipe's directory.
    Mode(SandboxMode),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SandboxMode {
    #[serde(rename = "recipe-dir")]
    RecipeDir,
}

impl Default for SandboxSetting {
    fn default() -> Self {
        SandboxSetting::Enabled(true)
    }
}

impl SandboxSetting {
    fn is_default(&self) -> bool {
        *self == SandboxSetting::default()
    }

    /// `on`, `recipe-dir` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxSetting::Enabled(true) => "on",
            SandboxSetting::Enabled(false) => "off",
            SandboxSetting::Mode(SandboxMode::RecipeDir) => "recipe-dir",
        }
    }
}

impl Kind for CommandParams {
    const REQUIRED: &'static [&'static str] = &["cmd", "outputs"];
    const NAME: &'static str = "command";
    const SUMMARY: &'static str = "run a shell command (data preparation)";
}

impl CommandParams {
    /// Render `cmd` with each input's path and the output directory. Input names are what the
    /// recipe wrote in `inputs`; a name the template uses but `inputs` lacks is an error.
    pub fn render(&self, input_paths: &[String], out: &str) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        // A command is a line or two: a template that loops or grows without end is an error,
        // not a hang (fuel bounds both the instructions run and the memory allocated).
        env.set_fuel(Some(COMMAND_TEMPLATE_FUEL));
        let inputs: BTreeMap<String, String> = self
            .inputs
            .iter()
            .cloned()
            .zip(input_paths.iter().cloned())
            .collect();
        let template = env
            .template_from_str(&self.cmd)
            .map_err(|e| template_error(&e))?;
        template
            .render(minijinja::context! { inputs => inputs, out => out })
            .map_err(|e| template_error(&e))
    }

    /// The command with placeholders for paths, as it enters the key: independent of where
    /// the store and the recipe live, and of the input nodes' names.
    pub fn key_command(&self) -> Result<String, String> {
        let placeholders: Vec<String> = (0..self.inputs.len())
            .map(|i| format!("<input {i}>"))
            .collect();
        self.render(&placeholders, "<out>")
    }
}

fn template_error(err: &minijinja::Error) -> String {
    let mut message = err.kind().to_string();
    if let Some(detail) = err.detail() {
        message = format!("{message}: {detail}");
    }
    message
}

impl StageSpec for CommandParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        inputs_list("inputs", &self.inputs, Expect::Any)
    }
    fn produces(&self) -> Produces {
        Produces::Files(
            self.outputs
                .iter()
                .map(|(name, path)| (name.clone(), path.clone()))
                .collect(),
        )
    }
    fn deps(&self) -> Vec<(ValuePath, String)> {
        self.deps
            .iter()
            .enumerate()
            .map(|(i, dep)| (ValuePath::root().key("deps").index(i), dep.clone()))
            .collect()
    }
    fn read_paths(&self) -> Vec<(ValuePath, String)> {
        self.read_paths
            .iter()
            .enumerate()
            .map(|(i, p)| (ValuePath::root().key("read_paths").index(i), p.clone()))
            .collect()
    }
    fn key_params(&self) -> serde_json::Value {
        let mut params = self.params();
        // Invalid templates are reported by `check`; keep the raw text so keying never fails.
        let cmd = self.key_command().unwrap_or_else(|_| self.cmd.clone());
        params["cmd"] = serde_json::Value::String(cmd);
        // Input names appear only through the template; the inputs' keys enter by position.
        // The sandbox settings restrict the command without adding to what it reads, and the
        // files of `read_paths` enter by content (keying.rs), never by path.
        let map = params
            .as_object_mut()
            .expect("struct serialises to an object");
        for field in ["inputs", "sandbox", "network", "read_paths"] {
            map.remove(field);
        }
        params
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let root = ValuePath::root();
        if self.cmd.trim().is_empty() {
            errors.push(FieldError::new(root.key("cmd"), "`cmd` is empty"));
        } else if let Err(err) = self.key_command() {
            errors.push(FieldError::new(
                root.key("cmd"),
                format!("invalid command template: {err} (the template sees `inputs.NAME` for each name in `inputs`, and `out`)"),
            ));
        }
        if self.outputs.is_empty() {
            errors.push(FieldError::new(
                root.key("outputs"),
                "declare at least one output file",
            ));
        }
        for (name, path) in &self.outputs {
            if !is_plain_relative(path) {
                errors.push(FieldError::new(
                    root.key("outputs").key(name),
                    "an output must be a relative path inside `{{ out }}`",
                ));
            }
            if !crate::recipe::is_valid_name(name) {
                errors.push(FieldError::new(
                    root.key("outputs").key(name),
                    "output names use letters, digits, `_` and `-`",
                ));
            }
        }
        for (i, path) in self.read_paths.iter().enumerate() {
            if path.trim().is_empty() {
                errors.push(FieldError::new(
                    root.key("read_paths").index(i),
                    "a read path is empty",
                ));
            }
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if self.inputs[..i].contains(input) {
                errors.push(FieldError::new(
                    root.key("inputs").index(i),
                    format!("`{input}` is listed twice"),
                ));
            }
        }
        errors
    }
}

/// A relative path that stays inside its base directory.
pub(crate) fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cmd: &str, inputs: &[&str]) -> CommandParams {
        CommandParams {
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.into(),
            outputs: [("train".to_string(), "train.jsonl".to_string())].into(),
            ..CommandParams::default()
        }
    }

    #[test]
    fn renders_inputs_and_out() {
        let p = params("prep {{ inputs.raw }} {{ out }}/x", &["raw"]);
        assert_eq!(
            p.render(&["/data/raw.txt".into()], "/store/tmp").unwrap(),
            "prep /data/raw.txt /store/tmp/x"
        );
    }

    #[test]
    fn key_command_ignores_input_names_and_paths() {
        let a = params("prep {{ inputs.raw }} {{out}}/x", &["raw"]);
        let b = params("prep {{ inputs.source }} {{ out }}/x", &["source"]);
        assert_eq!(a.key_command().unwrap(), b.key_command().unwrap());
        assert_eq!(a.key_params(), b.key_params());
    }

    #[test]
    fn unknown_template_names_are_errors() {
        let p = params("prep {{ inputs.missing }}", &["raw"]);
        let errors = p.check();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("invalid command template"));
    }

    #[test]
    fn sandbox_settings_stay_out_of_the_key() {
        let plain = params("prep {{ out }}/x", &[]);
        let mut confined = plain.clone();
        confined.sandbox = SandboxSetting::Mode(SandboxMode::RecipeDir);
        confined.network = true;
        confined.read_paths = vec!["/opt/data".into()];
        assert_eq!(plain.key_params(), confined.key_params());
        // Defaults are not written into the parameters the lockfile records either.
        assert!(plain.params().get("sandbox").is_none());
        assert_eq!(confined.params()["sandbox"], "recipe-dir");
        let parsed: CommandParams = serde_json::from_value(serde_json::json!({
            "cmd": "x", "outputs": {"a": "a"}, "sandbox": false
        }))
        .unwrap();
        assert_eq!(parsed.sandbox.as_str(), "off");
    }

    #[test]
    fn runaway_command_templates_are_errors() {
        let p = params(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            &[],
        );
        let err = p.render(&[], "/out").unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn outputs_stay_inside_out() {
        assert!(is_plain_relative("a/b.jsonl"));
        assert!(!is_plain_relative("../x"));
        assert!(!is_plain_relative("/abs"));
        assert!(!is_plain_relative(""));
    }
}
