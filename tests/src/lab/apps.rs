//! Real application servers from Debian's packages as the lab's upstreams: gunicorn (pre-fork
//! master, sync workers, a worker timeout) and php-fpm (a pool of children behind nginx's
//! `fastcgi_pass`, on a Unix socket and on TCP). Their own ways of failing, not ours: a master
//! killing a worker past its `--timeout`, a worker crashing, a pool exhausted, a script killed by
//! `request_terminate_timeout`, a socket gone after a stop.

use std::{
    ffi::{OsStr, OsString},
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{LabAddr, proxy::Daemon};
use crate::{netns::Netns, process::MemoryCgroup};

/// How long nginx waits for these upstreams' responses: longer than any app server's own
/// limit, so that what nginx sees is the app server's doing.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The WSGI app gunicorn serves: `/slow` outlives the worker timeout, `/crash` kills its own
/// worker with SIGSEGV.
const WSGI_APP: &str = r#"import os, signal, time

def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/slow":
        time.sleep(60)
    elif path == "/crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
"#;

/// An application server behind one of the lab's routes, and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// gunicorn, two sync workers, `--timeout 2`; nginx asks for `/slow`, which sleeps 60 s:
    /// the master kills the worker, whose connection closes before any response.
    GunicornTimeout,
    /// gunicorn whose app kills its own worker with SIGSEGV on every request (`/crash`).
    GunicornCrash,
    /// php-fpm with one child (`pm.max_children = 1`) and `listen.backlog = 1`, a script that
    /// takes 2 s: the pool is exhausted and the listener's queue full (a Unix socket's connect()
    /// fails at once; a TCP one's SYNs are dropped).
    PhpFpmExhausted,
    /// php-fpm on TCP whose `request_terminate_timeout` (1 s) kills a script that sleeps 10 s.
    PhpFpmTerminate,
    /// php-fpm on a Unix socket, stopped before the load: the socket is gone.
    PhpFpmStopped,
    /// php-fpm on TCP with one child and a script that takes 10 s, behind a 1 s read timeout,
    /// asked by several clients at once: the child has one request (a slow upstream), the
    /// others wait in the accept queue until nginx gives up (never accepted).
    PhpFpmSlow,
    /// php-fpm on TCP with one child, in a memory-limited cgroup, and a script that allocates
    /// until the OOM killer takes the child (the master starts another).
    PhpFpmOom,
}

/// The memory limit of [`App::PhpFpmOom`]'s cgroup.
const OOM_LIMIT: u64 = 64 << 20;

impl App {
    fn is_php(self) -> bool {
        matches!(
            self,
            App::PhpFpmExhausted
                | App::PhpFpmTerminate
                | App::PhpFpmStopped
                | App::PhpFpmSlow
                | App::PhpFpmOom
        )
    }

    /// The script (php-fpm) or path (gunicorn) nginx asks for.
    fn script(self) -> &'static str {
        match self {
            App::GunicornTimeout => "/slow",
            App::GunicornCrash => "/crash",
            App::PhpFpmExhausted => "busy.php",
            App::PhpFpmTerminate => "slow.php",
            App::PhpFpmStopped => "index.php",
            App::PhpFpmSlow => "slow.php",
            App::PhpFpmOom => "hog.php",
        }
    }

    /// How long nginx waits for its response.
    pub fn read_timeout(self) -> Duration {
        match self {
            App::PhpFpmSlow => Duration::from_secs(1),
            _ => READ_TIMEOUT,
        }
    }

    /// nginx's `location /` body for a route to upstream group `name` of this app.
    pub fn nginx_location(self, name: &str, dir: &Path) -> String {
        let timeout = self.read_timeout().as_secs();
        if self.is_php() {
            let script = dir.join("apps").join(self.script());
            format!(
                "fastcgi_pass {name}; fastcgi_read_timeout {timeout}s; \
                 fastcgi_connect_timeout {connect}ms; \
                 fastcgi_param SCRIPT_FILENAME {}; fastcgi_param REQUEST_METHOD $request_method; \
                 fastcgi_param QUERY_STRING \"\";",
                script.display(),
                connect = super::proxy_timeout().as_millis()
            )
        } else {
            format!(
                "proxy_pass http://{name}{}; proxy_read_timeout {timeout}s;",
                self.script()
            )
        }
    }

    /// Starts it at `addr` (TCP ones in `upstream_host`), its files in `dir`/apps, and waits
    /// until it accepts connections; a stopped one is started, then stopped.
    pub fn start(self, addr: &LabAddr, upstream_host: &Netns, dir: &Path) -> Daemon {
        let apps = dir.join("apps");
        std::fs::create_dir_all(&apps).expect("the apps' directory");
        write_scripts(&apps);
        let tag = match addr {
            LabAddr::Tcp(a) => a.port().to_string(),
            LabAddr::Unix(path) => Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let listen = match addr {
            LabAddr::Tcp(a) => a.to_string(),
            LabAddr::Unix(path) => path.to_string(),
        };
        let output = apps.join(format!("{tag}.log"));
        let (name, stop_signal, argv): (_, _, Vec<OsString>) = if self.is_php() {
            let conf = apps.join(format!("php-fpm-{tag}.conf"));
            std::fs::write(&conf, php_fpm_config(self, &listen, &apps, &tag))
                .expect("writing php-fpm's configuration");
            let php_fpm = php_fpm_binary().expect("php-fpm (cargo xtask setup installs it)");
            (
                "php-fpm",
                libc::SIGQUIT,
                vec![
                    php_fpm.into(),
                    "--nodaemonize".into(),
                    "--fpm-config".into(),
                    conf.into(),
                ],
            )
        } else {
            let args = [
                "gunicorn",
                "--bind",
                &listen,
                "--workers",
                "2",
                "--timeout",
                "2",
            ];
            let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
            argv.extend(["--chdir".into(), apps.clone().into(), "wsgi:app".into()]);
            // SIGTERM: gunicorn's master stops its workers and exits.
            ("gunicorn", libc::SIGTERM, argv)
        };
        let argv: Vec<&OsStr> = argv.iter().map(OsString::as_os_str).collect();
        let mut server = Daemon::start(
            name,
            upstream_host,
            &argv,
            &output,
            std::slice::from_ref(addr),
            stop_signal,
            Duration::from_secs(10),
        );
        if self == App::PhpFpmOom {
            server.confine(MemoryCgroup::new("lab-php-oom", OOM_LIMIT));
        }
        if self == App::PhpFpmStopped {
            server.stop();
            assert!(
                !Path::new(&listen).exists(),
                "php-fpm left its socket {listen} behind when it stopped"
            );
        }
        server
    }
}

fn write_scripts(apps: &Path) {
    let files = [
        ("wsgi.py", WSGI_APP),
        ("busy.php", "<?php usleep(2000000); echo \"done\\n\";\n"),
        ("slow.php", "<?php sleep(10); echo \"done\\n\";\n"),
        ("index.php", "<?php echo \"ok\\n\";\n"),
        (
            "hog.php",
            "<?php $a = []; while (true) { $a[] = str_repeat(\"x\", 1 << 20); }\n",
        ),
    ];
    // Each app's start writes them, while the app servers started before may be loading them
    // (a gunicorn worker importing a truncated wsgi.py fails to boot, and its master exits):
    // a script is replaced whole, by a rename, and only if it differs.
    for (name, text) in files {
        let path = apps.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
            continue;
        }
        let fresh = apps.join(format!(".{name}.new"));
        std::fs::write(&fresh, text).expect("writing an app's script");
        std::fs::rename(&fresh, &path).expect("putting an app's script in place");
    }
}

fn php_fpm_config(app: App, listen: &str, apps: &Path, tag: &str) -> String {
    let d = apps.display();
    let (children, backlog, terminate) = match app {
        App::PhpFpmExhausted => (1, 1, 0),
        App::PhpFpmTerminate => (2, 511, 1),
        App::PhpFpmSlow | App::PhpFpmOom => (1, 511, 0),
        _ => (2, 511, 0),
    };

    let mut conf = format!(
        "[global]
pid = {d}/php-fpm-{tag}.pid
error_log = {d}/php-fpm-{tag}.error.log
daemonize = no
[lab]
user = nobody
group = nogroup
listen = {listen}
listen.mode = 0666
listen.backlog = {backlog}
pm = static
pm.max_children = {children}
catch_workers_output = yes
php_admin_value[memory_limit] = -1
"
    );
    if terminate > 0 {
        let _ = writeln!(conf, "request_terminate_timeout = {terminate}s");
    }
    conf
}

/// Debian's php-fpm binary, whose name carries PHP's version (`php-fpm8.2`).
pub fn php_fpm_binary() -> Option<PathBuf> {
    std::fs::read_dir("/usr/sbin")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("php-fpm"))
        })
}
