//! A throwaway PostgreSQL server: `initdb` and `pg_ctl` in a temporary
//! directory, on a free port, logging every statement it receives. Also
//! used by the federation benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::RecordBatch;

pub(crate) const USER: &str = "meshgate";
pub(crate) const PASSWORD: &str = "pg-test-password";

/// A running PostgreSQL 15 server, stopped when dropped.
pub(crate) struct Postgres {
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    bin: PathBuf,
    as_root: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return dir;
            }
        }
    }
    for version in ["17", "16", "15"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    panic!("PostgreSQL binaries (initdb, pg_ctl) not found: install PostgreSQL 15");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    /// Initializes and starts a server.
    pub(crate) fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("meshgate-pg-")
            .tempdir()
            .unwrap();
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let server = Self {
            port: free_port(),
            bin: bin_dir(),
            as_root,
            dir,
        };
        // PostgreSQL refuses to run as root: run it as `postgres`.
        if as_root {
            run(Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(server.dir.path()));
            run(Command::new("chmod").args(["755"]).arg(server.dir.path()));
        }
        std::fs::write(server.dir.path().join("pwfile"), PASSWORD).unwrap();
        if as_root {
            run(Command::new("chown")
                .arg("postgres:")
                .arg(server.dir.path().join("pwfile")));
        }
        run(&mut server.command(
            "initdb",
            &[
                "-D",
                &server.data().to_string_lossy(),
                "-U",
                USER,
                "--auth=scram-sha-256",
                &format!("--pwfile={}", server.dir.path().join("pwfile").display()),
                "-E",
                "UTF8",
                "--no-sync",
            ],
        ));
        server.start_again();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut command = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.args(args);
        command
    }

    /// Starts the server (again, after [`Postgres::stop`]) on its port.
    pub(crate) fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c log_statement=all -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        run(&mut self.command(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &self.log_path().to_string_lossy(),
                "-w",
                "-o",
                &options,
                "start",
            ],
        ));
    }

    /// Restarts the server taking TLS connections only, with this
    /// certificate and key.
    pub(crate) fn require_tls(&self, cert: &Path, key: &Path) {
        self.stop();
        let data = self.data();
        std::fs::copy(cert, data.join("server.crt")).unwrap();
        std::fs::copy(key, data.join("server.key")).unwrap();
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")));
        if self.as_root {
            run(Command::new("chown")
                .arg("postgres:")
                .arg(data.join("server.crt"))
                .arg(data.join("server.key")));
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\n");
        std::fs::write(&conf, text).unwrap();
        let hba = data.join("pg_hba.conf");
        let text: String = std::fs::read_to_string(&hba)
            .unwrap()
            .lines()
            .map(|l| match l.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect();
        std::fs::write(&hba, text).unwrap();
        self.start_again();
    }

    /// Stops the server at once.
    pub(crate) fn stop(&self) {
        run(&mut self.command(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        ));
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// `postgres://` URL of database `postgres`.
    pub(crate) fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Every statement the server logged so far.
    pub(crate) fn statements(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let mut statements: Vec<String> = Vec::new();
        for line in log.lines() {
            if let Some((_, sql)) = line.split_once("statement: ") {
                statements.push(sql.to_string());
            } else if let Some((_, rest)) = line.split_once("LOG:  execute ")
                && let Some((_, sql)) = rest.split_once(": ")
            {
                statements.push(sql.to_string());
            } else if line.starts_with('\t')
                && let Some(last) = statements.last_mut()
            {
                last.push(' ');
                last.push_str(line.trim());
            }
        }
        statements
    }

    /// Runs SQL statements.
    pub(crate) async fn execute(&self, sql: &str) {
        let client = self.client().await;
        client.batch_execute(sql).await.unwrap();
    }

    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Creates `table` with the batches' columns and copies their rows into it.
    pub(crate) async fn load(&self, table: &str, batches: &[RecordBatch]) {
        let schema = batches[0].schema();
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| {
                let ty = match f.data_type() {
                    arrow::datatypes::DataType::Int64 => "bigint".to_string(),
                    arrow::datatypes::DataType::Int32 => "integer".to_string(),
                    arrow::datatypes::DataType::Float64 => "double precision".to_string(),
                    arrow::datatypes::DataType::Date32 => "date".to_string(),
                    arrow::datatypes::DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
                    _ => "text".to_string(),
                };
                format!("{} {ty}", f.name())
            })
            .collect();
        use futures::SinkExt;
        let client = self.client().await;
        client
            .batch_execute(&format!("CREATE TABLE {table} ({})", columns.join(", ")))
            .await
            .unwrap();
        let mut csv = Vec::new();
        {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(false)
                .build(&mut csv);
            for batch in batches {
                writer.write(batch).unwrap();
            }
        }
        let sink = client
            .copy_in(&format!("COPY {table} FROM STDIN (FORMAT csv)"))
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        for chunk in csv.chunks(1 << 20) {
            sink.send(bytes::Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
        sink.close().await.unwrap();
        client
            .batch_execute(&format!("ANALYZE {table}"))
            .await
            .unwrap();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command(
                "pg_ctl",
                &[
                    "-D",
                    &self.data().to_string_lossy(),
                    "-m",
                    "immediate",
                    "stop",
                ],
            )
            .output();
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a PostgreSQL command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads a Parquet file or every Parquet file of a directory.
pub(crate) fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut batches = Vec::new();
    for file in files {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(file).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        batches.extend(reader.map(|b| b.unwrap()));
    }
    batches
}
