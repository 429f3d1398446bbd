"""`python -m kernel_service` is the `kernel-service` command."""

from kernel_service.cli import main

if __name__ == "__main__":
    main()
