"""Submit, plan, observe: everything that decides what runs. It never reads file bytes."""
