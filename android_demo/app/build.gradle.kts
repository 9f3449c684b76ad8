plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

val executorchVersion: String by project
val useLocalAar: String by project

android {
    namespace = "org.effllm.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.effllm.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        // ExecuTorch ships arm64-v8a (phones) and x86_64 (emulators) native libraries.
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    if (useLocalAar.toBoolean()) {
        implementation(files("libs/executorch.aar"))
        // what the Maven artifact's POM would bring in (ExecuTorch's "Using AAR file directly")
        implementation("com.facebook.soloader:soloader:0.10.5")
        implementation("com.facebook.fbjni:fbjni:0.7.0")
    } else {
        implementation("org.pytorch:executorch-android:$executorchVersion")
    }
    implementation("androidx.appcompat:appcompat:1.7.0")
}
