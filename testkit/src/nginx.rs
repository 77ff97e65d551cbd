//! nginx (Debian's) as a guest: a config serving `www` on `listen` (`port` or
//! `ip:port`), with every path nginx writes kept under `dir`, so several can run at once.

use std::path::Path;

/// Write `dir/nginx.conf` and return the argv that runs nginx in the foreground.
pub fn guest_argv(dir: &Path, listen: &str, www: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
         server {{ listen {listen}; root {www}; }}\n}}\n",
        www = www.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    [
        "/usr/sbin/nginx",
        "-c",
        &path.to_string_lossy(),
        "-p",
        &dir.to_string_lossy(),
        "-e",
        &dir.join("error.log").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
