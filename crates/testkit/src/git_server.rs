//! A real git server for tests: `git http-backend` (Debian's git) behind lighttpd
//! (Debian's package, which `scripts/setup` installs), over smart HTTP on one address with
//! basic authentication on every request, reads included. Its repositories are bare
//! repositories in a scratch directory, filled and inspected with the git command line.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The one account the server knows.
pub const USER: &str = "agent";

/// A running server. Dropping it stops the server and removes its repositories.
pub struct GitServer {
    child: Child,
    dir: PathBuf,
    ip: std::net::IpAddr,
    port: u16,
    token: String,
}

/// Where lighttpd is, or a loud failure: a test that needs it must not pass without it.
fn lighttpd() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let path = Path::new(dir).join("lighttpd");
        if path.is_file() {
            return path;
        }
    }
    panic!("lighttpd is missing: run scripts/setup (it installs Debian's lighttpd)");
}

fn http_backend() -> PathBuf {
    let out = Command::new("git")
        .arg("--exec-path")
        .output()
        .expect("git must be installed");
    let path = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("git-http-backend");
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// Runs git with no configuration but the command line's, and panics with its stderr if
/// it fails; answers its stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@localhost")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@localhost")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl GitServer {
    /// Starts a server on 127.0.0.1 whose one account is [`USER`] with a fresh random
    /// token.
    pub fn start() -> GitServer {
        GitServer::start_on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// [`GitServer::start`] on `ip`, such as one a node's pods reach.
    pub fn start_on(ip: std::net::IpAddr) -> GitServer {
        let mut bytes = [0u8; 12];
        getrandom::fill(&mut bytes).expect("random bytes");
        let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        let token = format!("gittoken-{token}");
        let dir = crate::scratch_dir().join(format!(
            "git-server-{}-{}",
            std::process::id(),
            token.get(9..17).unwrap_or_default()
        ));
        let repos = dir.join("repos");
        std::fs::create_dir_all(&repos).expect("the server's directory");
        // A free port, released just before lighttpd binds it.
        let port = TcpListener::bind((ip, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        std::fs::write(dir.join("users"), format!("{USER}:{token}\n")).expect("the users file");
        let config = format!(
            r#"server.modules = ("mod_alias", "mod_auth", "mod_authn_file", "mod_cgi", "mod_setenv")
server.document-root = "{repos}"
server.bind = "{ip}"
server.port = {port}
server.errorlog = "{dir}/error.log"
alias.url = ("/git/" => "{backend}/")
cgi.assign = ("" => "")
setenv.add-environment = ("GIT_PROJECT_ROOT" => "{repos}", "GIT_HTTP_EXPORT_ALL" => "1")
auth.backend = "plain"
auth.backend.plain.userfile = "{dir}/users"
auth.require = ("/git/" => ("method" => "basic", "realm" => "git", "require" => "valid-user"))
"#,
            repos = repos.display(),
            dir = dir.display(),
            backend = http_backend().display(),
        );
        let config_path = dir.join("lighttpd.conf");
        std::fs::write(&config_path, config).expect("the server's config");
        let child = Command::new(lighttpd())
            .arg("-D")
            .arg("-f")
            .arg(&config_path)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting lighttpd");
        let server = GitServer {
            child,
            dir,
            ip,
            port,
            token,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "lighttpd did not listen on {port}: {}",
                std::fs::read_to_string(server.dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The account's token (its password).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The URL of repository `name`, without credentials.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}:{}/git/{name}.git", self.ip, self.port)
    }

    /// The bare repository `name` on the server's disk.
    pub fn bare(&self, name: &str) -> PathBuf {
        self.dir.join("repos").join(format!("{name}.git"))
    }

    /// Creates repository `name` with branch `main` holding `files` in one commit, and
    /// answers that commit. Pushes are allowed.
    pub fn create(&self, name: &str, files: &[(&str, &[u8])]) -> String {
        let bare = self.bare(name);
        git(
            &self.dir,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                &bare.display().to_string(),
            ],
        );
        git(&bare, &["config", "http.receivepack", "true"]);
        let work = self.dir.join(format!("{name}-seed"));
        git(
            &self.dir,
            &["init", "-q", "-b", "main", &work.display().to_string()],
        );
        self.commit(&work, files, "the first commit");
        git(&work, &["push", "-q", &bare.display().to_string(), "main"]);
        std::fs::remove_dir_all(&work).ok();
        git(&bare, &["rev-parse", "main"])
    }

    /// Adds a commit with `files` on top of `branch` of repository `name` (created from
    /// `main` if it does not exist), straight on the server's disk; answers the commit.
    pub fn advance(
        &self,
        name: &str,
        branch: &str,
        files: &[(&str, &[u8])],
        message: &str,
    ) -> String {
        let bare = self.bare(name);
        let work = self
            .dir
            .join(format!("{name}-work-{branch}").replace('/', "-"));
        std::fs::remove_dir_all(&work).ok();
        git(
            &self.dir,
            &[
                "clone",
                "-q",
                &bare.display().to_string(),
                &work.display().to_string(),
            ],
        );
        let exists = !git(&work, &["ls-remote", "--heads", "origin", branch]).is_empty();
        if exists {
            git(&work, &["checkout", "-q", branch]);
        } else {
            git(&work, &["checkout", "-q", "-b", branch]);
        }
        self.commit(&work, files, message);
        git(&work, &["push", "-q", "origin", branch]);
        std::fs::remove_dir_all(&work).ok();
        git(&bare, &["rev-parse", branch])
    }

    /// Tags `commit` of repository `name`.
    pub fn tag(&self, name: &str, tag: &str, commit: &str) {
        git(&self.bare(name), &["tag", tag, commit]);
    }

    /// The commit `branch` of repository `name` points at, if it exists.
    pub fn head(&self, name: &str, branch: &str) -> Option<String> {
        let out = Command::new("git")
            .args([
                "rev-parse",
                "--verify",
                "-q",
                &format!("refs/heads/{branch}"),
            ])
            .current_dir(self.bare(name))
            .output()
            .expect("running git");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Clones `branch` of repository `name` over HTTP with the account's credentials, the
    /// way a user would see it, into a fresh directory.
    pub fn clone_over_http(&self, name: &str, branch: &str) -> PathBuf {
        let target = self
            .dir
            .join(format!("{name}-check-{branch}").replace('/', "-"));
        std::fs::remove_dir_all(&target).ok();
        let url = self
            .url(name)
            .replace("http://", &format!("http://{USER}:{}@", self.token));
        git(
            &self.dir,
            &[
                "clone",
                "-q",
                "--branch",
                branch,
                &url,
                &target.display().to_string(),
            ],
        );
        target
    }

    fn commit(&self, work: &Path, files: &[(&str, &[u8])], message: &str) {
        for (path, content) in files {
            let path = work.join(path);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("a directory");
            std::fs::write(path, content).expect("a file");
        }
        git(work, &["add", "-A"]);
        git(work, &["commit", "-q", "-m", message]);
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
