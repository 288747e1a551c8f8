"""What each app tab computes, as plain functions over one model cache."""
