"""`python -m detector`: run the detector service against the NATS named by NATS_URL."""
from shared.service import run_service

if __name__ == "__main__":
    run_service("detector")
