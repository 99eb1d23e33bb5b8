"""Text towers (text_encoder hook) and pathology report cleaning (report_cleaner hook) for slide–report
alignment (SPEC §5)."""
