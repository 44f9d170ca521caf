//! The `meshgate` command: `check` on good and broken configs.

use std::process::Command;

use crate::fixture::{demo_config_dir, edit};

fn meshgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
}

/// `meshgate check` on the config in `dir`.
fn check(dir: &std::path::Path) -> std::process::Output {
    meshgate()
        .args(["check", "--config"])
        .arg(dir.join("meshgate.toml"))
        .output()
        .unwrap()
}

#[test]
fn check_lists_what_the_demo_would_publish() {
    let dir = demo_config_dir();
    let output = check(dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("publish sales.orders: o_orderkey Int64"),
        "{stdout}"
    );
    assert!(stdout.contains("publish supply.supplier:"), "{stdout}");
    assert!(
        stdout.contains("ok: 10 products would be published"),
        "{stdout}"
    );
}

#[test]
fn check_on_a_broken_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    meshgate::demo::write_demo_config(dir.path()).unwrap();
    edit(
        &dir.path().join("domains/crm.toml"),
        "storage = \"lake\"",
        "storage = \"warehouse\"",
    );
    let output = check(dir.path());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("crm.toml"), "{stderr}");
    assert!(
        stderr.contains("products[0] (`customer`).storage"),
        "{stderr}"
    );
    assert!(stderr.contains("warehouse"), "{stderr}");
}

#[test]
fn check_reports_a_product_whose_files_break_its_contract() {
    let dir = demo_config_dir();
    edit(
        &dir.path().join("domains/crm.toml"),
        "{ name = \"c_custkey\", type = \"Int64\" }",
        "{ name = \"c_custkey\", type = \"Utf8\" }",
    );
    let output = check(dir.path());
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("refuse crm.customer"), "{stdout}");
    assert!(
        stdout.contains("c_custkey") && stdout.contains("declared Utf8"),
        "{stdout}"
    );
    // The view that reads it is withdrawn too, and says why.
    assert!(
        stdout.contains("refuse sales.revenue_by_nation"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_a_product_whose_pii_columns_no_policy_protects() {
    let dir = demo_config_dir();
    // Without the tag policy, crm.customer's `pii` columns are unprotected.
    edit(
        &dir.path().join("meshgate.toml"),
        "tag = \"pii\"",
        "tag = \"personal\"",
    );
    let output = check(dir.path());
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("refuse crm.customer"), "{stdout}");
    assert!(
        stdout.contains("column `c_address` is tagged `pii` but no policy masks or denies it"),
        "{stdout}"
    );
    assert!(stdout.contains("columns.c_address = { mask"), "{stdout}");
    // The rest of the mesh is published.
    assert!(stdout.contains("publish sales.orders"), "{stdout}");

    // A product policy that masks one column and denies the other suffices.
    let crm = dir.path().join("domains/crm.toml");
    let text = std::fs::read_to_string(&crm).unwrap();
    std::fs::write(
        &crm,
        format!(
            "{text}\n[[policies]]\nproduct = \"customer\"\ncolumns.c_address = {{ mask = \"'***'\" }}\ncolumns.c_phone = {{ deny = true }}\n"
        ),
    )
    .unwrap();
    let output = check(dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("publish crm.customer"), "{stdout}");
}

#[test]
fn check_warns_of_products_without_owner_or_description() {
    let dir = demo_config_dir();
    let support = dir.path().join("domains/support.toml");
    edit(&support, "owner = \"support-data@acme.example\"\n", "");
    edit(
        &support,
        "description = \"One row per support ticket\"\n",
        "",
    );
    let output = check(dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Published all the same: the contract requires neither.
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("publish support.tickets"), "{stdout}");
    assert!(
        stdout.contains("warn support.tickets") && stdout.contains("no owner: add `owner = "),
        "{stdout}"
    );
    assert!(
        stdout.contains("no description: add `description = "),
        "{stdout}"
    );
    assert!(stdout.contains("(2 warning(s))"), "{stdout}");
    // A domain team's CI can make them errors.
    let output = meshgate()
        .args(["check", "--strict", "--config"])
        .arg(dir.path().join("meshgate.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    // The domain's owner covers its products.
    std::fs::write(
        &support,
        format!(
            "owner = \"support@acme.example\"\n{}",
            std::fs::read_to_string(&support).unwrap()
        ),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&check(dir.path()).stdout).to_string();
    assert!(!stdout.contains("no owner"), "{stdout}");
    assert!(stdout.contains("(1 warning(s))"), "{stdout}");
}

#[test]
fn hash_password_and_token_helpers_work() {
    use std::io::Write;
    let mut child = meshgate()
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("$argon2id$"));

    let dir = tempfile::tempdir().unwrap();
    meshgate::demo::write_demo_config(dir.path()).unwrap();
    let output = meshgate()
        .args(["token", "--user", "alice", "--config"])
        .arg(dir.path().join("meshgate.toml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8_lossy(&output.stdout);
    assert_eq!(token.trim().split('.').count(), 3);
}

#[test]
fn explain_access_shows_what_a_user_sees() {
    let dir = demo_config_dir();
    let run = |args: &[&str]| {
        let output = meshgate()
            .args(["explain-access", "--config"])
            .arg(dir.path().join("meshgate.toml"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let alice = run(&["--user", "alice", "--product", "crm.customer"]);
    assert!(alice.contains("product crm.customer: visible"), "{alice}");
    assert!(
        alice.contains("row filter: (c_region = 'EUROPE')"),
        "{alice}"
    );
    assert!(
        alice
            .lines()
            .any(|l| l.contains("c_phone") && l.contains("masked as '***'")),
        "{alice}"
    );
    assert!(
        alice
            .lines()
            .any(|l| l.contains("c_acctbal") && l.contains("denied")),
        "{alice}"
    );
    let carol = run(&["--user", "carol", "--product", "crm.customer"]);
    assert!(carol.contains("row filter: none"), "{carol}");
    assert!(
        carol
            .lines()
            .any(|l| l.contains("c_acctbal") && l.ends_with("visible")),
        "{carol}"
    );
    let dave = run(&["--user", "dave", "--product", "crm.customer"]);
    assert!(dave.contains("not visible"), "{dave}");
    // Any identity, by groups and attributes.
    let other = run(&[
        "--user",
        "zed",
        "--group",
        "analyst",
        "--attr",
        "region=ASIA",
        "--product",
        "crm.customer",
    ]);
    assert!(other.contains("row filter: (c_region = 'ASIA')"), "{other}");
}
