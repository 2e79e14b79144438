//! The tenants file an operator writes: never a panic, whatever the YAML; a file that loads
//! authenticates a made-up token as nobody.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera::tenancy::Tenants;

fuzz_target!(|data: &[u8]| {
    let path =
        std::env::temp_dir().join(format!("tessera-fuzz-tenants-{}.yaml", std::process::id()));
    std::fs::write(&path, data).expect("written");
    if let Ok(tenants) = Tenants::from_file(&path) {
        assert!(tenants.multi_tenant());
        let _ = tenants.shares();
        assert!(tenants
            .authenticate(Some("Bearer \u{0}not-a-token\u{0}"))
            .is_err());
        assert!(tenants.authenticate(None).is_err());
    }
});
