use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

const GATEWAY: &str = r#"
domains = ["domains/*.toml"]
[auth]
issuer = "meshgate"
audience = "meshgate"
hs256_secret = "${SECRET}"
token_ttl = "2h"
[limits]
query_timeout = "30s"
memory_per_query = "1GiB"
gateway_memory = "3GiB"
max_recursion_depth = 50
row_group_cache = "64MiB"
page_cache = "32MiB"
"#;

const DOMAIN: &str = r#"
name = "crm"
[storage.lake]
type = "object_store"
url = "file://data/crm"
[[products]]
name = "customers"
storage = "lake"
location = "customers/"
format = "parquet"
columns = [{ name = "id", type = "Int64" }, { name = "when", type = "Timestamp(Microsecond, Some(\"UTC\"))" }, { name = "amount", type = "Decimal128(15, 2)" }]
"#;

fn env(name: &str) -> Option<String> {
    (name == "SECRET").then(|| "0123456789abcdef0123".to_string())
}

#[test]
fn loads_gateway_and_domains_with_typed_values() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = write(dir.path(), "meshgate.toml", GATEWAY);
    write(dir.path(), "domains/crm.toml", DOMAIN);
    let config = MeshConfig::load_with_env(&gateway, env).unwrap();
    assert_eq!(config.auth.token_ttl, Duration::from_secs(7200));
    assert_eq!(
        config.auth.hs256_secret.as_deref(),
        Some("0123456789abcdef0123")
    );
    assert_eq!(config.limits.query_timeout, Duration::from_secs(30));
    assert_eq!(config.limits.memory_per_query, Some(1 << 30));
    assert_eq!(config.limits.gateway_memory, 3 << 30);
    assert_eq!(config.limits.max_recursion_depth, 50);
    assert_eq!(config.limits.row_group_cache, 64 << 20);
    assert_eq!(config.limits.page_cache, 32 << 20);
    let product = &config.domains[0].products[0];
    let ProductSource::Files { url, format, .. } = &product.source else {
        panic!("expected a file product");
    };
    assert_eq!(*format, FileFormat::Parquet);
    let expected = std::path::absolute(dir.path().join("domains/data/crm/customers/")).unwrap();
    assert_eq!(url.to_file_path().unwrap(), expected);
    assert_eq!(product.columns[2].data_type, DataType::Decimal128(15, 2));
    assert!(matches!(
        product.columns[1].data_type,
        DataType::Timestamp(_, Some(_))
    ));
}

fn load_error(gateway: &str, domain: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "meshgate.toml", gateway);
    write(dir.path(), "domains/crm.toml", domain);
    MeshConfig::load_with_env(&path, env)
        .unwrap_err()
        .to_string()
}

#[test]
fn every_mistake_names_file_and_key() {
    let err = load_error(&GATEWAY.replace("[limits]", "[limits]\nbogus = 1"), DOMAIN);
    assert!(
        err.contains("meshgate.toml") && err.contains("bogus"),
        "{err}"
    );

    let err = load_error(
        GATEWAY,
        &DOMAIN.replace("storage = \"lake\"", "storage = \"lake2\""),
    );
    assert!(
        err.contains("crm.toml") && err.contains("products[0]") && err.contains("lake2"),
        "{err}"
    );

    let duplicated = format!("{DOMAIN}\n[[products]]\nname = \"customers\"\nsql = \"SELECT 1\"\n");
    let err = load_error(GATEWAY, &duplicated);
    assert!(
        err.contains("crm.toml") && err.contains("products[1].name") && err.contains("twice"),
        "{err}"
    );

    let err = load_error(GATEWAY, "name = \"crm\"\n[[products]\n");
    assert!(
        err.contains("crm.toml") && err.contains("TOML parse error"),
        "{err}"
    );

    let err = load_error(&GATEWAY.replace("${SECRET}", "${NOT_SET_ANYWHERE}"), DOMAIN);
    assert!(
        err.contains("meshgate.toml") && err.contains("NOT_SET_ANYWHERE"),
        "{err}"
    );

    let err = load_error(&GATEWAY.replace("2h", "2 fortnights"), DOMAIN);
    assert!(err.contains("auth.token_ttl"), "{err}");

    let err = load_error(
        &GATEWAY.replace("max_recursion_depth = 50", "max_recursion_depth = 0"),
        DOMAIN,
    );
    assert!(err.contains("limits.max_recursion_depth"), "{err}");
    let err = load_error(&GATEWAY.replace("\"3GiB\"", "\"lots\""), DOMAIN);
    assert!(err.contains("limits.gateway_memory"), "{err}");

    let err = load_error(GATEWAY, &DOMAIN.replace("Decimal128(15, 2)", "Money"));
    assert!(
        err.contains("columns[2].type") && err.contains("Money"),
        "{err}"
    );

    let err = load_error(GATEWAY, &DOMAIN.replace("name = \"crm\"", "name = \"Crm\""));
    assert!(err.contains("name") && err.contains("lowercase"), "{err}");

    let err = load_error(
        GATEWAY,
        &DOMAIN.replace("location = \"customers/\"", "location = \"../../etc\""),
    );
    assert!(err.contains("location"), "{err}");
}

#[test]
fn cloud_stores_take_the_options_their_store_knows() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = write(dir.path(), "meshgate.toml", GATEWAY);
    let domain = DOMAIN.replace(
        "url = \"file://data/crm\"",
        "url = \"s3://lake/crm\"\noptions = { Endpoint = \"http://127.0.0.1:9000\", \
         allow_http = true, aws_region = \"eu-west-1\", secret_access_key = \"${SECRET}\" }\n\
         [storage.gcs]\ntype = \"object_store\"\nurl = \"gs://bucket/x\"\n\
         options = { service_account_key = \"{}\" }\n\
         [storage.blob]\ntype = \"object_store\"\nurl = \"az://container\"\n\
         options = { account_name = \"acme\", use_emulator = true }",
    );
    write(dir.path(), "domains/crm.toml", &domain);
    let config = MeshConfig::load_with_env(&gateway, env).unwrap();
    let storage = &config.domains[0].storage;
    let StorageConfig::ObjectStore { url, options } = &storage["lake"] else {
        panic!("expected object storage");
    };
    assert_eq!(url.as_str(), "s3://lake/crm/");
    let options: Vec<(&str, &str)> = options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        options,
        [
            ("allow_http", "true"),
            ("aws_region", "eu-west-1"),
            ("endpoint", "http://127.0.0.1:9000"),
            ("secret_access_key", "0123456789abcdef0123"),
        ]
    );
    assert!(
        matches!(&storage["gcs"], StorageConfig::ObjectStore { url, .. } if url.scheme() == "gs")
    );
    assert!(
        matches!(&storage["blob"], StorageConfig::ObjectStore { url, .. } if url.scheme() == "az")
    );

    let err = load_error(
        GATEWAY,
        &DOMAIN.replace(
            "url = \"file://data/crm\"",
            "url = \"s3://lake\"\noptions = { endpoint_url = \"x\", bucket_owner = \"me\" }",
        ),
    );
    assert!(
        err.contains("storage.lake.options")
            && err.contains("`bucket_owner` is not an option of s3://"),
        "{err}"
    );
    let err = load_error(
        GATEWAY,
        &DOMAIN.replace(
            "url = \"file://data/crm\"",
            "url = \"file://data/crm\"\noptions = { region = \"x\" }",
        ),
    );
    assert!(err.contains("not file://"), "{err}");
    let err = load_error(GATEWAY, &DOMAIN.replace("file://data/crm", "hdfs://nn/crm"));
    assert!(err.contains("`hdfs://` is not supported"), "{err}");
}

#[test]
fn the_demo_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo/meshgate.toml");
    let config = MeshConfig::load_with_env(&dir, |_| None).unwrap();
    let names: Vec<&str> = config.domains.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["crm", "sales", "supply", "support"]);
    assert_eq!(config.auth.users.len(), 4);
}
